"""``attnkit tour``: one small worked example of every mechanism, printed (seconds on a CPU)."""

from __future__ import annotations

import argparse
from functools import partial

import torch

from attnkit import _argtypes as A


def register(subparsers) -> None:
    p = subparsers.add_parser("tour", help="print one small worked example of every mechanism",
                              description=__doc__)
    p.add_argument("--seed", type=A.int_at_least(0, 2**31 - 1), default=0, help="random seed (default 0)")
    p.set_defaults(func=run)


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 72 - len(title)))


def _show_mask(m: torch.Tensor) -> str:
    return "\n".join("    " + " ".join("#" if x else "." for x in row) for row in m.tolist())


def run(args: argparse.Namespace) -> int:
    from attnkit import masks
    from attnkit import nn as ann
    from attnkit.functional import additive, attention, gaussian, general, masked_softmax, scaled_dot

    torch.manual_seed(args.seed)
    torch.set_printoptions(precision=3, sci_mode=False)

    _section("1. attention pooling: Nadaraya-Watson (seed 003)")
    x_train, _ = torch.sort(torch.rand(50) * 5)
    y_train = 2 * torch.sin(x_train) + x_train**0.8 + torch.normal(0.0, 0.5, (50,))
    x_test = torch.arange(0, 5, 0.1)
    y_truth = 2 * torch.sin(x_test) + x_test**0.8
    for kind in ("average", "gaussian"):
        pool = ann.NadarayaWatson(kind=kind)
        y_hat = pool(x_test[None], x_train[None], y_train[None]).squeeze(0)
        print(f"  {kind:9s} pooling: mean squared error vs the true curve = {((y_hat - y_truth) ** 2).mean():.3f}")

    _section("2. scoring functions a(q, k) for one query and three keys")
    q = torch.randn(1, 4)
    k = torch.randn(3, 4)
    print("  scaled dot  q.k/sqrt(d)         :", scaled_dot(q, k))
    w = torch.randn(4, 4) / 2
    print("  general     q^T W k             :", general(q, k, w))
    w_q, w_k, w_v = torch.randn(8, 4), torch.randn(8, 4), torch.randn(8)
    print("  additive    w_v^T tanh(Wq q+Wk k):", additive(q, k, w_q, w_k, w_v))
    print("  gaussian    -||q-k||^2/2        :", gaussian(q, k))

    _section("3. masked softmax with d2l's valid_lens = [2, 3]")
    scores = torch.rand(2, 2, 4)
    print(masked_softmax(scores, masks.padding([2, 3]).materialize(2, 4)))

    _section("4. the general attention function with an injected score")
    keys, values = torch.randn(1, 5, 6), torch.randn(1, 5, 2)
    queries = torch.randn(1, 2, 3)  # queries and keys of different sizes: additive scoring
    w_q, w_k, w_v = torch.randn(8, 3), torch.randn(8, 6), torch.randn(8)
    out, weights = attention(queries, keys, values, score=partial(additive, w_q=w_q, w_k=w_k, w_v=w_v),
                             return_weights=True)
    print("  weights (rows sum to 1):\n", weights[0], "\n  out:", out[0])

    _section("5. self-attention with separate W_q, W_k, W_v (seeds 000, 002)")
    tokens = torch.randn(1, 4, 8)
    sa = ann.SelfAttention(8)
    out, weights = sa(tokens, return_weights=True)
    print(f"  I (1, 4, 8) -> O {tuple(out.shape)}; A' =\n", weights[0])

    _section("6. multi-head attention == torch.nn.MultiheadAttention")
    torch_mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    mha = ann.MultiHeadAttention.from_torch(torch_mha)
    x = torch.randn(2, 6, 16)
    ours = mha(x)
    theirs, _ = torch_mha(x, x, x, need_weights=False)
    print(f"  max |attnkit - torch| = {(ours - theirs).abs().max():.2e} for 4 heads, (B, L, E) = (2, 6, 16)")

    _section("7. positional encoding: sinusoidal (first 4 positions, 6 dims)")
    pe = ann.SinusoidalPositionalEncoding(6, max_len=16)
    print(pe(torch.zeros(1, 4, 6))[0])

    _section("8. truncated self-attention for speech: window(left=2, right=1) over 8 frames")
    print(_show_mask(masks.window(2, 1).materialize(8, 8)))

    _section("9. graph attention: attend only along edges (a 5-node path graph + self loops)")
    edges = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 4], [1, 0, 2, 1, 3, 2, 4, 3]])
    print(_show_mask(masks.graph(edges, num_nodes=5, add_self_loops=True).materialize(5, 5)))

    _section("10. linear attention is an RNN: recurrent steps == parallel causal form")
    la = ann.LinearAttention(8, 2, causal=True)
    x = torch.randn(1, 6, 8)
    parallel = la(x)
    state, steps = None, []
    for t in range(6):
        y_t, state = la.step(x[:, t], state)
        steps.append(y_t)
    print(f"  max |recurrent - parallel| = {(torch.stack(steps, 1) - parallel).abs().max():.2e}")

    _section("11. S2Attention: spatial shifts + split attention over 3 branches, any channel count")
    s2 = ann.S2Attention(12)
    img = torch.randn(1, 12, 5, 5)
    print(f"  (1, 12, 5, 5) -> {tuple(s2(img).shape)}")

    print(f"\nDone. The cost of full attention grows as L^2 (L=4096: {4096**2 / 1e6:.0f}M pairs per head); "
          f"a window of 128 covers {(4096 * 257) / 1e6:.1f}M. See `attnkit bench`.")
    return 0
