"""The tiled kernel's hand-written forward and backward (FlashAttention-2's recurrences, ``score_mod`` inside).

Forward, per step of a few query blocks and their gathered key tiles (no autograd record):

    S = (scale Q) K^T ;  S' = score_mod(S, b, h, q_idx, kv_idx) ;  S' = -inf where a partial tile forbids
    m = max_j S' ;  P = exp(S' - m) ;  l = sum_j P ;  O = P V / l ;  lse = m + log l

Backward recomputes S' per step from the saved log-sum-exp, and runs autograd only through ``score_mod`` on
that step's tile (``torch.autograd.grad``), for dS and for the tensors the ``score_mod`` captures:

    P = exp(S' - lse) ;  dV += P^T dO ;  dP = dO V^T ;  dS' = P (dP - rowsum(dO O))
    dS, dC = d score_mod^T dS'  ;  dQ = scale dS K ;  dK += dS^T (scale Q)

The captured tensors are found by running ``score_mod`` once under a ``TorchFunctionMode`` that records every
tensor that requires grad reaching a torch function; they become inputs of the autograd function, so their
gradients flow on to whatever produced them. Only q, k, v, out and lse are saved (no ``L x S``).

Shape letters: N flattened batch rows, L queries (padded to whole blocks), S keys, D, Dv head dims, Bq rows per
block, Kw keys per block of a group, n batch rows and g blocks of a step.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from attnkit.kernels._contract import apply_score_mod, split_steps
from attnkit.masks import BlockMask

__all__ = ["captured_tensors", "TiledAttention"]


class _Recorder(TorchFunctionMode):
    def __init__(self, exclude: tuple[Tensor, ...]):
        super().__init__()
        self.exclude = {id(t) for t in exclude}
        self.found: dict[int, Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}

        def visit(x):
            if isinstance(x, Tensor) and x.requires_grad and id(x) not in self.exclude:
                self.found.setdefault(id(x), x)
            elif isinstance(x, (list, tuple)):
                for y in x:
                    visit(y)

        for a in list(args) + list(kwargs.values()):
            visit(a)
        return func(*args, **kwargs)


def captured_tensors(score_mod, dtype, device) -> list[Tensor]:
    """The tensors requiring grad that ``score_mod`` reads besides its arguments (a learnable ALiBi slope, a
    relative-bias table), found by one call on a 1 x 1 tile."""
    s = torch.zeros(1, 1, 1, 1, dtype=dtype, device=device, requires_grad=True)
    idx = [torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device) for _ in range(4)]
    rec = _Recorder((s, *idx))
    with torch.enable_grad(), rec:
        score_mod(s, *idx)
    return list(rec.found.values())


class _Steps:
    """The steps of a plan: gathered inputs and index tensors, shared by forward and backward."""

    def __init__(self, plan: BlockMask, N: int, L: int, batch: tuple, budget: int, keep_fn, device):
        self.plan, self.N, self.L, self.batch, self.budget = plan, N, L, batch, budget
        self.keep_fn, self.device = keep_fn, device
        self.nbq = -(-L // plan.block)
        self._cache: list | None = None

    def __iter__(self):
        if self._cache is None:  # built on the forward's pass, replayed by the backward
            self._cache = list(self._build())
        return iter(self._cache)

    def _build(self):
        Bq, dev = self.plan.block, self.device
        H = self.batch[-1] if len(self.batch) >= 2 else 1
        rows_in_block = torch.arange(Bq, device=dev)
        for grp in self.plan.groups:
            G, Kw = grp.kidx.shape
            # FlexAttention's index tensors: int32, broadcastable to a step's scores (n|1, g, Bq|1, Kw|1)
            qi_all = (grp.qblocks.view(-1, 1) * Bq + rows_in_block).clamp(max=max(self.L - 1, 0)).to(torch.int32)
            kv_all = grp.kidx.to(torch.int32)
            # blocks whose keys are one contiguous run (a causal row, a band): read as slices, no gather
            first = grp.kidx[:, 0].tolist()
            runs = ((grp.kidx[:, 1:] - grp.kidx[:, :-1]) == 1).all(-1).tolist() if Kw > 1 else [True] * G
            for (n0, n1), (a, b) in split_steps(G, self.N, Bq * Kw, self.budget):
                n, g = n1 - n0, b - a
                rows = (torch.arange(n0, n1, device=dev).view(-1, 1) * self.nbq + grp.qblocks[a:b]).flatten()
                ni = torch.arange(n0, n1, device=dev, dtype=torch.int32).view(-1, 1, 1, 1)
                bi, hi = (ni // H, ni % H) if len(self.batch) >= 2 else (ni, torch.zeros_like(ni))
                idx = (bi, hi, qi_all[a:b].view(1, g, Bq, 1), kv_all[a:b].view(1, g, 1, Kw))
                span = (first[a], first[a] + Kw) if g == 1 and runs[a] else None
                flat = span if span is not None else grp.kidx[a:b].flatten()
                yield (n0, n1, n, g, Kw, rows, flat, idx, self.keep_fn(grp, a, b, n0, n1))


_FLOOR = -60.0  # exp(-60) = 8.8e-27 of the row's largest term: nothing in a float32 sum (eps 1.2e-7), and far
# from float32's subnormals (below 1.2e-38), which the exp and every later product with them pay ten times for
_TINY = 8.8e-27  # exp(_FLOOR) = 8.756e-27 rounds below this; anything at or below it came from the floor: 0


def _exp_shifted(s: Tensor, m: Tensor) -> Tensor:
    """``exp(s - m)`` as a fresh tensor. In float32 the argument is floored at -60 and what reached the floor is
    set to 0: -inf (masked) stays exactly 0, rows stay exact to float32 rounding (a term below e^-60 of the row's
    largest cannot change a float32 sum), and no subnormal float reaches exp or the matmuls after it (subnormal
    inputs are about ten times slower on x86)."""
    x = s - m
    if x.dtype != torch.float32:
        return x.exp_()
    return torch.nn.functional.threshold_(x.clamp_(min=_FLOOR).exp_(), _TINY, 0.0)


def _take(x: Tensor, n0: int, n1: int, flat, g: int, Kw: int) -> Tensor:
    """Keys or values of batch rows [n0, n1) at ``flat`` (g * Kw,) indices, or a ``(start, stop)`` run (a view):
    (n, g, Kw, d)."""
    if isinstance(flat, tuple):
        return x[n0:n1, flat[0]:flat[1]].unsqueeze(1)
    return x[n0:n1].index_select(1, flat).view(n1 - n0, g, Kw, x.shape[-1])


def _add_at(acc: Tensor, n0: int, n1: int, flat, grad: Tensor) -> None:
    """``acc[n0:n1]`` at ``flat`` (indices or a run) += ``grad`` (n, g, Kw, d)."""
    if isinstance(flat, tuple):
        acc[n0:n1, flat[0]:flat[1]] += grad.squeeze(1)
    else:
        acc[n0:n1].index_add_(1, flat, grad.flatten(1, 2))


def _scores(qs: Tensor, kb: Tensor, score_mod, idx) -> Tensor:
    s = torch.matmul(qs, kb.transpose(-1, -2))  # (n, g, Bq, Kw): (scale Q) K^T
    if score_mod is not None:
        s = apply_score_mod(score_mod, s, idx)
    return s


class TiledAttention(torch.autograd.Function):
    """(N, nbq * Bq, D) blocked-padded q, (N, S, D) k, (N, S, Dv) v -> out (N * nbq, Bq, Dv), lse (N * nbq, Bq)."""

    @staticmethod
    def forward(ctx, q, k, v, steps: _Steps, scale: float, score_mod, *captured):
        N, Lp, D = q.shape
        Bq, Dv = steps.plan.block, v.shape[-1]
        qb = q.reshape(N * steps.nbq, Bq, D)
        out = q.new_zeros(N * steps.nbq, Bq, Dv)
        lse = q.new_full((N * steps.nbq, Bq), float("-inf"))
        for n0, n1, n, g, Kw, rows, flat, idx, keep in steps:
            qs = qb.index_select(0, rows).view(n, g, Bq, D).mul_(scale)
            kb, vb = _take(k, n0, n1, flat, g, Kw), _take(v, n0, n1, flat, g, Kw)
            s = _scores(qs, kb, score_mod, idx)
            if keep is not None:
                s = torch.where(keep, s, float("-inf"))
            # a row with nothing allowed: m = -inf, clamped to the lowest float, so P = 0, l = 0, O = 0, lse = -inf
            m = s.amax(-1, keepdim=True).clamp_(min=torch.finfo(s.dtype).min)
            p = _exp_shifted(s, m)  # (n, g, Bq, Kw)
            l = p.sum(-1, keepdim=True)  # >= 1 on a row with an allowed key (its largest term is exp(0))
            o = torch.matmul(p, vb).div_(l.clamp(min=1e-30))  # O = P V / l
            out.index_copy_(0, rows, o.view(-1, Bq, Dv))
            lse.index_copy_(0, rows, l.log_().add_(m).view(-1, Bq))
        ctx.save_for_backward(q, k, v, out, lse, *captured)
        ctx.steps, ctx.scale, ctx.score_mod, ctx.ncap = steps, scale, score_mod, len(captured)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout: Tensor, _dlse):
        q, k, v, out, lse, *captured = ctx.saved_tensors
        steps, scale, score_mod = ctx.steps, ctx.scale, ctx.score_mod
        N, Lp, D = q.shape
        Bq, Dv = steps.plan.block, v.shape[-1]
        qb = q.reshape(N * steps.nbq, Bq, D)
        dout = dout.to(q.dtype)
        delta = (dout * out).sum(-1)  # (N * nbq, Bq): rowsum(dO O)
        lse = torch.where(torch.isfinite(lse), lse, float("inf"))  # empty rows: P = 0
        dq = torch.zeros_like(qb)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dcap = [torch.zeros_like(c) for c in captured]
        for n0, n1, n, g, Kw, rows, flat, idx, keep in steps:
            qs = qb.index_select(0, rows).view(n, g, Bq, D).mul_(scale)
            kb, vb = _take(k, n0, n1, flat, g, Kw), _take(v, n0, n1, flat, g, Kw)
            dos = dout.index_select(0, rows).view(n, g, Bq, Dv)
            if score_mod is not None:
                with torch.enable_grad():
                    s_raw = torch.matmul(qs, kb.transpose(-1, -2)).requires_grad_()
                    s = apply_score_mod(score_mod, s_raw, idx)
                    s_val = s.detach()
            else:
                s_val = torch.matmul(qs, kb.transpose(-1, -2))
            if keep is not None:
                s_val = torch.where(keep, s_val, float("-inf"))
            # P = exp(S' - lse)
            p = _exp_shifted(s_val, lse.index_select(0, rows).view(n, g, Bq, 1))
            # dV += P^T dO
            _add_at(dv, n0, n1, flat, torch.matmul(p.transpose(-1, -2), dos))
            # dS' = P (dO V^T - delta)
            ds = torch.matmul(dos, vb.transpose(-1, -2)).sub_(delta.index_select(0, rows).view(n, g, Bq, 1))
            ds.mul_(p)
            if score_mod is not None:
                if not s.requires_grad:  # score_mod ignored its score (a pure bias): dS = 0
                    grads = [torch.zeros_like(s_raw)] + [None] * len(captured)
                else:
                    grads = torch.autograd.grad(s, [s_raw, *captured], torch.broadcast_to(ds, s.shape),
                                                allow_unused=True)
                ds = grads[0]
                for acc, gr in zip(dcap, grads[1:], strict=True):
                    if gr is not None:
                        acc.add_(gr)
            # dQ = scale dS K ;  dK += dS^T (scale Q)
            dq.index_copy_(0, rows, torch.matmul(ds, kb).mul_(scale).view(-1, Bq, D))
            _add_at(dk, n0, n1, flat, torch.matmul(ds.transpose(-1, -2), qs))
        return (dq.view(N, Lp, D), dk, dv, None, None, None, *dcap)
