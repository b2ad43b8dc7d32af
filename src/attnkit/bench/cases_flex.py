"""Benchmark cases of programmable attention (issue 11): FlexAttention's mods through ``attnkit.flex``.

Every case is float32, B=1, H=8, D=64 (``--quick`` shrinks them), implementations interleaved in one process:

* ``flex-window128-L16384-{fwd,fwd+bwd}``: a sliding window written as a ``mask_mod``
  (``(q_idx - kv_idx).abs() <= 128``) against ``masks.window(128, 128)`` (``window``) and, forward, FlexAttention
  compiled (``flex``; it refuses backward on a CPU, shown as such);
* ``flex-docs16-causal-L16384-{fwd,fwd+bwd}``: 16 packed documents, causal, as a ``mask_mod`` over captured
  document ids, against SDPA with the dense boolean mask and FlexAttention compiled;
* ``flex-alibi-causal-L8192-{fwd,fwd+bwd}``: ALiBi as a ``score_mod`` with a causal block mask, against attnkit's
  plain causal attention (``causal``: SDPA's fused causal kernel) and FlexAttention compiled;
* ``flex-create-block-mask-window128-L{16384,65536}``: planning the sliding-window ``mask_mod``, against torch's
  ``create_block_mask`` (at 65536 it is not run: it would evaluate the mod on 4.3e9 pairs), peak memory of each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit import flex, masks, scores
from attnkit.bench import anchors
from attnkit.bench.anchors import AnchorUnavailable, _qkv, _runner
from attnkit.functional.attention import attention


def _refused(reason: str):
    def make():
        raise AnchorUnavailable(reason)
    return make


_NO_CPU_BWD = "FlexAttention refuses: 'FlexAttention does not support backward on CPU'"


def sliding(w: int):
    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= w
    return sliding_window


def documents_causal(doc_ids: torch.Tensor):
    def document_causal(b, h, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx)
    return document_causal


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def alibi(slopes: torch.Tensor):
    def alibi_bias(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return alibi_bias


def _flex_factory(B, H, L, D, mode, mask_mod, score_mod=None):
    def make():
        q, k, v = _qkv(B, H, L, L, D, grad=mode != "fwd")
        bm = flex.create_block_mask(mask_mod, None, None, L, L)
        return _runner(lambda a, b, c: flex.flex_attention(a, b, c, score_mod=score_mod, block_mask=bm), [q, k, v],
                       mode)
    return make


def _attn_factory(B, H, L, D, mode, mask):
    def make():
        q, k, v = _qkv(B, H, L, L, D, grad=mode != "fwd")
        return _runner(lambda a, b, c: attention(a, b, c, mask=mask), [q, k, v], mode)
    return make


def _sdpa_dense_factory(B, H, L, D, mode, mask_mod):
    def make():
        q, k, v = _qkv(B, H, L, L, D, grad=mode != "fwd")
        dense = flex.create_mask(mask_mod, None, None, L, L)[0, 0]  # (L, S) bool
        return _runner(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=dense), [q, k, v], mode)
    return make


def _create_factory(L: int, w: int, which: str):
    def make():
        if which == "torch":
            from torch.nn.attention.flex_attention import create_block_mask
            return lambda: create_block_mask(sliding(w), None, None, L, L, device="cpu")
        return lambda: flex.create_block_mask(sliding(w), None, None, L, L)  # a new mask_mod: nothing cached
    return make


def flex_cases(quick: bool, *, with_flex: bool = True):
    """The issue-11 cases (see the module docstring)."""
    from attnkit.bench.cases import Case

    B, H, D = (1, 2, 16) if quick else (1, 8, 64)
    fb = {"fwd": 1, "fwd+bwd": 3}
    out = []
    w = 32 if quick else 128
    Lw = 1024 if quick else 16384
    win_pairs = sum(min(Lw - 1, i + w) - max(0, i - w) + 1 for i in range(Lw))
    for mode in ("fwd", "fwd+bwd"):
        impls = {"attnkit": _flex_factory(B, H, Lw, D, mode, sliding(w)),
                 "window": _attn_factory(B, H, Lw, D, mode, masks.window(w, w))}
        cid = f"flex-window{w}-L{Lw}-{mode}"
        if with_flex and not quick:
            impls["flex"] = (anchors.flex_factory(cid, B, H, Lw, D, sliding(w)) if mode == "fwd"
                             else _refused(_NO_CPU_BWD))
        out.append(Case(cid, f"flex-window{w}-{mode}", Lw, mode, impls, 4.0 * B * H * win_pairs * D * fb[mode],
                        "window (the plan is a band)", role=f"flex_window_{'fwd' if mode == 'fwd' else 'fwdbwd'}",
                        note="attnkit = flex_attention(block_mask=create_block_mask(|q - kv| <= w)); "
                             "window = attention(mask=masks.window(w, w))"))

    Ld = 1024 if quick else 16384
    ndoc = 16
    doc_ids = torch.arange(Ld) * ndoc // Ld  # 16 equal documents
    doc_mod = documents_causal(doc_ids)
    doc_pairs = ndoc * (Ld // ndoc) * (Ld // ndoc + 1) // 2
    for mode in ("fwd", "fwd+bwd"):
        cid = f"flex-docs{ndoc}-causal-L{Ld}-{mode}"
        impls = {"attnkit": _flex_factory(B, H, Ld, D, mode, doc_mod),
                 "sdpa": _sdpa_dense_factory(B, H, Ld, D, mode, doc_mod)}
        if with_flex and not quick:
            impls["flex"] = (anchors.flex_factory(cid, B, H, Ld, D, doc_mod) if mode == "fwd"
                             else _refused(_NO_CPU_BWD))
        out.append(Case(cid, f"flex-docs-{mode}", Ld, mode, impls, 4.0 * B * H * doc_pairs * D * fb[mode],
                        "blocksparse", role=f"flex_docs_{'fwd' if mode == 'fwd' else 'fwdbwd'}",
                        note=f"{ndoc} packed documents of {Ld // ndoc}, causal, mask_mod over captured ids; "
                             "sdpa = dense boolean mask"))

    La = 1024 if quick else 8192
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)])
    for mode in ("fwd", "fwd+bwd"):
        cid = f"flex-alibi-causal-L{La}-{mode}"
        impls = {"attnkit": _flex_factory(B, H, La, D, mode, causal, scores.alibi(slopes)),
                 "attnkit_closure": _flex_factory(B, H, La, D, mode, causal, alibi(slopes)),
                 "causal": _attn_factory(B, H, La, D, mode, masks.causal())}
        if with_flex and not quick:
            impls["flex"] = (anchors.flex_factory(cid, B, H, La, D, causal, score_mod=alibi(slopes))
                             if mode == "fwd" else _refused(_NO_CPU_BWD))
        out.append(Case(cid, f"flex-alibi-{mode}", La, mode, impls, 4.0 * B * H * La * (La + 1) // 2 * D * fb[mode],
                        "tiled", role=f"flex_alibi_{'fwd' if mode == 'fwd' else 'fwdbwd'}",
                        note="attnkit = flex_attention(score_mod=attnkit.scores.alibi(slopes), causal block "
                             "mask): the built-in ALiBi, fused by the compiled kernel where it is built; "
                             "attnkit_closure = the same with ALiBi written as a closure (the tiled kernel calls it "
                             "per tile); causal = attention(mask=masks.causal()) (SDPA's fused causal kernel)"))

    for Lc in ((1024, 4096) if quick else (16384, 65536)):
        impls = {"attnkit": _create_factory(Lc, w, "attnkit")}
        impls["torch"] = (_create_factory(Lc, w, "torch") if Lc <= (1024 if quick else 16384) else
                          _refused(f"not run: torch's create_block_mask evaluates the mask_mod on all {Lc}^2 = "
                                   f"{Lc * Lc:.2g} pairs"))
        out.append(Case(f"flex-create-block-mask-window{w}-L{Lc}", "flex-create-block-mask", Lc, "fwd", impls,
                        None, "-", memory=tuple(m for m in ("attnkit", "torch") if Lc <= 16384 or m == "attnkit"),
                        role=f"flex_cbm_L{'main' if Lc in (1024, 16384) else 'long'}",
                        note="planning a sliding-window mask_mod: attnkit classifies tiles from index intervals"))
    return out
