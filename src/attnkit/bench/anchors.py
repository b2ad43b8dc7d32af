"""Optional and independent anchors of ``attnkit bench``: FlexAttention, local-attention, GATConv, broadcast additive.

Each ``*_factory`` returns a :data:`~attnkit.bench.cases.Factory`: calling it builds seeded inputs and returns a
closure that runs one call. An anchor that cannot run here (package not installed, no C++ compiler for
``torch.compile``) raises :class:`AnchorUnavailable` from its factory with the reason; the bench prints that
reason in the table instead of a time. Install the optional ones with ``pip install 'attnkit[bench]'``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

#: compile seconds of the FlexAttention anchors, by case id, filled when their factories run
COMPILE_TIMES: dict[str, float] = {}


class AnchorUnavailable(RuntimeError):
    """An optional anchor cannot run on this machine; the message says why."""


def _require(module: str, pip_name: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise AnchorUnavailable(f"{pip_name} not installed (pip install 'attnkit[bench]')") from exc


def _qkv(B, H, L, S, D, *, grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(B, H, n, D, generator=g) for n in (L, S, S)]
    return [t.requires_grad_(grad) for t in ts]


def _runner(fn: Callable, inputs: list[torch.Tensor], mode: str) -> Callable[[], object]:
    """One call of ``fn(*inputs)``: under ``no_grad`` for "fwd", with the gradients of the inputs for "fwd+bwd"."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run
    grad_out = {}

    def run_bwd():
        out = fn(*inputs)
        if "g" not in grad_out:
            grad_out["g"] = torch.randn_like(out)
        return torch.autograd.grad(out, inputs, grad_out["g"])
    return run_bwd


def flex_factory(case_id: str, B: int, H: int, L: int, D: int, mask_mod: Callable, score_mod: Callable | None = None):
    """FlexAttention compiled with ``torch.compile`` (forward only); the compile time goes to COMPILE_TIMES."""
    def make():
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as exc:
            raise AnchorUnavailable(f"torch {torch.__version__} has no FlexAttention") from exc
        q, k, v = _qkv(B, H, L, L, D, grad=False)
        t0 = time.perf_counter()
        try:
            block_mask = create_block_mask(mask_mod, None, None, L, L, device="cpu")
            compiled = torch.compile(flex_attention, dynamic=False)
            with torch.no_grad():
                compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)
        except Exception as exc:  # no compiler, unsupported CPU, ...: say why in the table
            first = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else ""
            raise AnchorUnavailable(f"FlexAttention does not compile here: {type(exc).__name__}: {first}") from exc
        COMPILE_TIMES[case_id] = time.perf_counter() - t0
        return _runner(lambda a, b, c: compiled(a, b, c, score_mod=score_mod, block_mask=block_mask), [q, k, v],
                       "fwd")
    return make


def window_mask_mod(w: int) -> Callable:
    """FlexAttention ``mask_mod`` of ``masks.window(w, w)`` for L == S: query i sees keys i-w .. i+w."""
    def mask_mod(b, h, qi, kj):
        return (kj >= qi - w) & (kj <= qi + w)
    return mask_mod


def local_attention_factory(B: int, H: int, L: int, D: int, w: int, mode: str):
    """lucidrains' ``LocalAttention`` with ``window_size=w``, one bucket back and ahead, exact window: query i
    sees keys i-w .. i+w, the same function as ``masks.window(w, w)`` (it computes 3 buckets of w keys)."""
    def make():
        mod = _require("local_attention", "local-attention")
        attn = mod.LocalAttention(window_size=w, causal=False, look_backward=1, look_forward=1,
                                  exact_windowsize=True, autopad=True)
        q, k, v = _qkv(B, H, L, L, D, grad=mode != "fwd")
        return _runner(lambda a, b, c: attn(a, b, c), [q, k, v], mode)
    return make


def gatconv_factory(N: int, edge_index: torch.Tensor, H: int, D: int):
    """PyTorch Geometric's ``GATConv`` (H heads of D, no added self loops), forward+backward to its input."""
    def make():
        pyg = _require("torch_geometric.nn", "torch_geometric")
        torch.manual_seed(0)
        conv = pyg.GATConv(H * D, D, heads=H, add_self_loops=False)
        x = torch.randn(N, H * D, requires_grad=True)
        grad_out = torch.randn(N, H * D)
        return lambda: torch.autograd.grad(conv(x, edge_index), [x], grad_out)
    return make


def additive_broadcast(q, k, v, w_q, w_k, w_v):
    """Additive attention written the broadcast way, lean (tanh in place): holds one (B, L, S, hidden) tensor.

    ``out = softmax(w_v^T tanh(W_q q + W_k k)) @ v``.

    Shape:
        q (B, L, Dq), k (B, S, Dk), v (B, S, Dv) -> (B, L, Dv).
    """
    # tanh(W_q q + W_k k) for every pair, in place
    features = torch.tanh_((q @ w_q.T).unsqueeze(-2) + (k @ w_k.T).unsqueeze(-3))  # (B, L, S, hidden)
    # softmax(w_v^T tanh(...)) @ v
    return torch.softmax(features @ w_v, dim=-1) @ v  # (B, L, Dv)
