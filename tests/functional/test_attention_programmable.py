"""attention(score_mod=, return_lse=, return_weights="sparse"), and what backend="auto" may do with a score
callable: never split one that depends on positions across key chunks."""

from __future__ import annotations

import pytest
import torch

from attnkit import masks
from attnkit.functional import attention
from attnkit.kernels import dispatch
from reference import attention_ref, window_ref


def _rel_closure(rel):
    def score(q, k):  # a relative-position score written as (q, k): positions from the shapes it is given
        i = torch.arange(q.shape[-2], device=q.device).view(-1, 1)
        j = torch.arange(k.shape[-2], device=q.device).view(1, -1)
        return q @ k.transpose(-1, -2) / 8.0 + rel[i - j + k.shape[-2]]
    return score


def test_position_dependent_score_callable_is_never_split_across_key_chunks(gen, device):
    """The issue's silent-wrong case: at L = S = 1024 auto used to hand such a closure chunks of keys."""
    L = 1024
    rel = torch.randn(2 * L + 1, generator=gen).to(device)
    q, k, v = (torch.randn(1, 2, L, 64, generator=gen).to(device) for _ in range(3))
    score = _rel_closure(rel)
    req = dict(score=score, score_mod=None, mask=None, bias=None, normalize="softmax", scale=None, dropout_p=0.0,
               return_weights=False, return_lse=False)
    assert dispatch.choose(q, k, v, **req) == "math"
    out = attention(q, k, v, score=score)
    ref = attention(q, k, v, score=score, backend="math")
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="score_mod"):
        attention(q, k, v, score=score, backend="chunked")  # refused, saying what to do
    score.index_free = True  # a callable may declare itself chunkable
    assert dispatch.choose(q, k, v, **{**req, "score": score}) == "chunked"


def test_the_same_bias_as_score_mod_is_tiled_and_exact(gen, device):
    L = 300
    rel = torch.randn(2 * L + 1, dtype=torch.float64, generator=gen, requires_grad=True)
    q, k, v = (torch.randn(1, 2, L, 16, dtype=torch.float64, generator=gen, requires_grad=True) for _ in range(3))
    # the kernel's leaves on the device; the references below keep the CPU leaves
    dq, dk, dv, drel = (t.detach().to(device, copy=True).requires_grad_() for t in (q, k, v, rel))

    def score_mod(s, b, h, qi, kv):
        return s + drel[qi - kv + L]

    out = attention(dq, dk, dv, score_mod=score_mod, mask=masks.causal())
    i, j = torch.arange(L).view(-1, 1), torch.arange(L).view(1, -1)
    ref = attention_ref(q, k, v, mask=window_ref(L, L, None, 0), bias=rel[i - j + L])[0]
    torch.testing.assert_close(out.detach().cpu(), ref.detach(), atol=1e-10, rtol=1e-10)
    # gradients against PyTorch's SDPA in float64 on the CPU with the same bias (the oracle above has no autograd)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=rel[i - j + L].masked_fill(~window_ref(L, L, None, 0), float("-inf")))
    g = torch.autograd.grad(out.sum(), [dq, dk, dv, drel])
    g_ref = torch.autograd.grad(ref.sum(), [q, k, v, rel])
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a.cpu(), b, atol=1e-9, rtol=1e-9)


BACKENDS_LSE = ["math", "sdpa", "window", "blocksparse", "tiled", "chunked"]


@pytest.mark.parametrize("backend", BACKENDS_LSE)
def test_lse_merges_key_blocks_exactly(backend, gen, device):
    """Attention over keys [0, 150) and [150, 300) merged with their log-sum-exps equals attention over all."""
    L = S = 300
    q, k, v = (torch.randn(1, 2, n, 16, dtype=torch.float64, generator=gen).to(device) for n in (L, S, S))
    mask = masks.window(40, 40)
    whole, lse = attention(q, k, v, mask=mask, backend=backend, return_lse=True)
    parts = []
    for a, b in ((0, 150), (150, 300)):
        part = mask.offset(0, a, L=L, S=S)
        use = "math" if backend == "window" else backend  # a shard of a band is not a band the kernel knows
        parts.append(attention(q, k[:, :, a:b], v[:, :, a:b], mask=part, backend=use, return_lse=True))
    (o1, l1), (o2, l2) = parts
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m).nan_to_num(0), torch.exp(l2 - m).nan_to_num(0)
    merged = (o1 * w1[..., None] + o2 * w2[..., None]) / (w1 + w2)[..., None]
    torch.testing.assert_close(merged, whole, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(torch.logaddexp(l1, l2), lse, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", ["window", "blocksparse", "tiled", "graph", "math"])
def test_sparse_weights_hold_only_computed_pairs_and_equal_the_dense_ones(backend, gen, device):
    L = 200
    if backend == "graph":
        i = torch.arange(L).repeat_interleave(21)
        j = (i + torch.arange(-10, 11).repeat(L)).clamp(0, L - 1)
        mask = masks.graph(torch.stack([j, i]), num_nodes=L)
    else:
        mask = masks.window(10, 10)
    q, k, v = (torch.randn(1, 2, L, 8, generator=gen) for _ in range(3))
    _, sparse = attention(q.to(device), k.to(device), v.to(device), mask=mask, backend=backend,
                          return_weights="sparse")
    _, dense = attention(q, k, v, mask=mask, backend="math", return_weights=True)  # the dense picture on the CPU
    assert sparse.is_sparse and sparse.shape == dense.shape and sparse.device.type == device.type
    assert sparse._nnz() <= 2 * L * 21 * 2  # the band (plus tile slack), not L x S
    torch.testing.assert_close(sparse.to_dense().cpu(), dense, atol=1e-6, rtol=1e-5)


def test_sparse_weights_of_a_long_window_go_to_the_explorer_without_l_by_s(tmp_path, gen):
    # CPU only: about the explorer page (the sparse weights themselves are checked on every device above)
    pytest.importorskip("jinja2")
    from attnkit.viz import write_explorer

    L = 2048
    q, k, v = (torch.randn(1, 8, L, 16, generator=gen) for _ in range(3))
    _, w = attention(q, k, v, mask=masks.window(64, 64), return_weights="sparse")
    assert w._nnz() < 8 * L * 400
    path = write_explorer(tmp_path / "window.html", [f"t{i}" for i in range(L)], w[0])
    assert path.stat().st_size > 0


def test_model_with_attnkit_compiles_with_fullgraph(gen):
    # CPU only: about tracing (torch.compile with the eager backend, torch.export), not about a kernel
    class Block(torch.nn.Module):
        def forward(self, x, lengths):
            return attention(x, x, x, mask=masks.causal() & masks.padding(lengths))

    x = torch.randn(2, 2, 16, 8, generator=gen)
    lengths = torch.tensor([16, 9])
    eager = Block()(x, lengths)
    compiled = torch.compile(Block(), fullgraph=True, backend="eager")(x, lengths)
    torch.testing.assert_close(compiled, eager)
    exported = torch.export.export(Block(), (x, lengths))
    torch.testing.assert_close(exported.module()(x, lengths), eager)
