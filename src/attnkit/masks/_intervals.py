"""Classify the tiles of a ``mask_mod`` from index intervals, without evaluating it on every pair.

A ``mask_mod(b, h, q_idx, kv_idx)`` written with integer arithmetic and comparisons (FlexAttention's style) is
run once on :class:`Interval` stand-ins: ``q_idx`` holds, for every tile, the interval of its query indices,
``kv_idx`` that of its keys, ``b`` and ``h`` the whole batch and head ranges. Arithmetic propagates bounds;
comparisons give three-valued answers (:class:`Truth`: may be true, may be false); ``&``, ``|``, ``~`` combine
them; indexing a captured integer tensor (document ids) gives the range of its values over the interval. The
result says per tile: certainly empty, certainly full, or unknown (then evaluated exactly on that tile).

Anything the stand-ins do not model raises :class:`Unsupported`, and the caller classifies every tile as
unknown: exact, only slower. Bounds are conservative by construction, so a wrong "empty" or "full" cannot come
out of an operation that is modelled.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from attnkit.masks._base import range_min_max


class Unsupported(Exception):
    """The mask_mod did something the interval stand-ins do not model."""


def _iv(x) -> Interval:
    if isinstance(x, Interval):
        return x
    if isinstance(x, bool) or isinstance(x, Tensor) and x.dtype == torch.bool:
        raise Unsupported("arithmetic on booleans")
    if isinstance(x, int):
        t = torch.tensor(x)
        return Interval(t, t)
    if isinstance(x, Tensor) and x.numel() == 1 and not x.is_floating_point():
        t = x.reshape(())
        return Interval(t, t)
    raise Unsupported(f"operand {type(x).__name__}")


class Interval:
    """Integer values between ``lo`` and ``hi`` (inclusive, broadcastable tensors)."""

    def __init__(self, lo: Tensor, hi: Tensor):
        self.lo, self.hi = lo, hi

    # arithmetic
    def __add__(self, o):
        o = _iv(o)
        return Interval(self.lo + o.lo, self.hi + o.hi)

    __radd__ = __add__

    def __sub__(self, o):
        o = _iv(o)
        return Interval(self.lo - o.hi, self.hi - o.lo)

    def __rsub__(self, o):
        return _iv(o) - self

    def __neg__(self):
        return Interval(-self.hi, -self.lo)

    def __mul__(self, o):
        o = _iv(o)
        c = torch.stack(torch.broadcast_tensors(self.lo * o.lo, self.lo * o.hi, self.hi * o.lo, self.hi * o.hi))
        return Interval(c.amin(0), c.amax(0))

    __rmul__ = __mul__

    def __floordiv__(self, o):
        if not isinstance(o, int) or isinstance(o, bool) or o <= 0:
            raise Unsupported("// by anything but a positive int")
        return Interval(self.lo // o, self.hi // o)

    def __mod__(self, o):
        if not isinstance(o, int) or isinstance(o, bool) or o <= 0:
            raise Unsupported("% by anything but a positive int")
        same = (self.lo // o) == (self.hi // o)  # the interval does not wrap
        return Interval(torch.where(same, self.lo % o, 0), torch.where(same, self.hi % o, o - 1))

    def abs(self):
        lo = torch.where(self.lo >= 0, self.lo, torch.where(self.hi <= 0, -self.hi, 0))
        hi = torch.maximum(self.lo.abs(), self.hi.abs())
        return Interval(lo, hi)

    __abs__ = abs

    def clamp(self, min=None, max=None):  # noqa: A002 (torch's names)
        lo, hi = self.lo, self.hi
        if min is not None:
            m = _iv(min)
            lo, hi = torch.maximum(lo, m.lo), torch.maximum(hi, m.lo)
        if max is not None:
            m = _iv(max)
            lo, hi = torch.minimum(lo, m.hi), torch.minimum(hi, m.hi)
        return Interval(lo, hi)

    # comparisons -> Truth
    def __lt__(self, o):
        o = _iv(o)
        return Truth(self.lo < o.hi, self.hi >= o.lo)

    def __le__(self, o):
        o = _iv(o)
        return Truth(self.lo <= o.hi, self.hi > o.lo)

    def __gt__(self, o):
        return _iv(o) < self

    def __ge__(self, o):
        return _iv(o) <= self

    def __eq__(self, o):  # noqa: D105
        o = _iv(o)
        overlap = (self.lo <= o.hi) & (o.lo <= self.hi)
        single = (self.lo == self.hi) & (o.lo == o.hi) & (self.lo == o.lo)
        return Truth(overlap, ~single)

    def __ne__(self, o):
        return ~(self == o)

    __hash__ = None

    def __bool__(self):
        raise Unsupported("Python control flow on an index")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Tensor.__getitem__:
            return _index(args[0], args[1])
        table = {torch.abs: Interval.abs, Tensor.abs: Interval.abs, torch.clamp: Interval.clamp,
                 Tensor.clamp: Interval.clamp, torch.minimum: _minimum, torch.maximum: _maximum,
                 torch.eq: operator.eq, torch.ne: operator.ne, torch.lt: operator.lt, torch.le: operator.le,
                 torch.gt: operator.gt, torch.ge: operator.ge, torch.where: _where, torch.remainder: operator.mod,
                 torch.floor_divide: operator.floordiv, torch.sub: operator.sub, torch.add: operator.add}
        if func in table:
            return table[func](*args, **kwargs)
        raise Unsupported(f"torch function {getattr(func, '__name__', func)}")


def _minimum(a, b):
    a, b = _iv(a), _iv(b)
    return Interval(torch.minimum(a.lo, b.lo), torch.minimum(a.hi, b.hi))


def _maximum(a, b):
    a, b = _iv(a), _iv(b)
    return Interval(torch.maximum(a.lo, b.lo), torch.maximum(a.hi, b.hi))


def _where(cond, a, b):
    cond = _truth(cond)
    if isinstance(a, (Interval, int)) and not isinstance(a, bool):
        a, b = _iv(a), _iv(b)
        lo = torch.where(cond.maybe_false, torch.minimum(a.lo, b.lo), a.lo)
        lo = torch.where(cond.maybe_true, lo, b.lo)
        hi = torch.where(cond.maybe_false, torch.maximum(a.hi, b.hi), a.hi)
        hi = torch.where(cond.maybe_true, hi, b.hi)
        return Interval(lo, hi)
    a, b = _truth(a), _truth(b)
    return Truth((cond.maybe_true & a.maybe_true) | (cond.maybe_false & b.maybe_true),
                 (cond.maybe_true & a.maybe_false) | (cond.maybe_false & b.maybe_false))


def _index(t: Tensor, idx) -> Interval:
    """``t[idx]`` with interval indices: the range of ``t``'s values over the index box. Integer tensors only;
    at most one index may differ per tile (the others are whole ranges, which are reduced first)."""
    if not isinstance(t, Tensor) or t.is_floating_point() or t.dtype == torch.bool:
        raise Unsupported("indexing a tensor that is not integer")
    idx = idx if isinstance(idx, tuple) else (idx,)
    if len(idx) != t.ndim:
        raise Unsupported("indexing with fewer indices than dims")
    lo_t, hi_t, varying = t, t, None
    for d, i in enumerate(idx):
        i = _iv(i)
        if i.lo.numel() == 1:  # the same interval for every tile: reduce that dim over it
            a = int(i.lo.clamp(0, t.shape[d] - 1))
            z = int(i.hi.clamp(0, t.shape[d] - 1)) + 1
            lo_t = lo_t.narrow(d, a, z - a).amin(d, keepdim=True)
            hi_t = hi_t.narrow(d, a, z - a).amax(d, keepdim=True)
        elif varying is None:
            varying = (d, i)
        else:
            raise Unsupported("indexing with two per-tile intervals")
    if varying is None:
        return Interval(lo_t.reshape(()), hi_t.reshape(()))
    d, i = varying
    shape = i.lo.shape
    flat_lo, flat_hi = i.lo.reshape(-1), i.hi.reshape(-1)
    lo_v, _ = range_min_max(lo_t.movedim(d, -1).reshape(-1, t.shape[d]).amin(0), flat_lo, flat_hi)
    _, hi_v = range_min_max(hi_t.movedim(d, -1).reshape(-1, t.shape[d]).amax(0), flat_lo, flat_hi)
    return Interval(lo_v.view(shape), hi_v.view(shape))


class Truth:
    """Three-valued booleans: ``maybe_true`` / ``maybe_false`` (both = unknown)."""

    def __init__(self, maybe_true: Tensor, maybe_false: Tensor):
        self.maybe_true, self.maybe_false = maybe_true, maybe_false

    def __and__(self, o):
        o = _truth(o)
        return Truth(self.maybe_true & o.maybe_true, self.maybe_false | o.maybe_false)

    __rand__ = __and__

    def __or__(self, o):
        o = _truth(o)
        return Truth(self.maybe_true | o.maybe_true, self.maybe_false & o.maybe_false)

    __ror__ = __or__

    def __invert__(self):
        return Truth(self.maybe_false, self.maybe_true)

    def __xor__(self, o):
        o = _truth(o)
        return (self & ~o) | (~self & o)

    def __bool__(self):
        raise Unsupported("Python control flow on a mask value")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        table = {torch.logical_and: operator.and_, torch.logical_or: operator.or_,
                 torch.logical_not: operator.invert, torch.bitwise_and: operator.and_,
                 torch.bitwise_or: operator.or_, torch.logical_xor: operator.xor, torch.where: _where,
                 Tensor.logical_and: operator.and_, Tensor.logical_or: operator.or_,
                 Tensor.logical_not: operator.invert}
        if func in table:
            return table[func](*args, **kwargs)
        raise Unsupported(f"torch function {getattr(func, '__name__', func)} on a mask value")


def _truth(x) -> Truth:
    if isinstance(x, Truth):
        return x
    if isinstance(x, bool):
        t = torch.tensor(x)
        return Truth(t, ~t)
    if isinstance(x, Tensor) and x.dtype == torch.bool and x.numel() == 1:
        t = x.reshape(())
        return Truth(t, ~t)
    raise Unsupported(f"boolean operand {type(x).__name__}")


def classify(mask_mod, B: int, H: int, q0: Tensor, q1: Tensor, k0: Tensor, k1: Tensor) -> Tensor | None:
    """Tile states (0 empty, 1 unknown, 2 full) of ``mask_mod`` over every ``b < B``, ``h < H``, or None when the
    mod does something :class:`Interval` does not model. Shape: q0/q1 (nq,), k0/k1 (nk,) -> int8 (nq, nk)."""
    zero = torch.zeros((), dtype=torch.long, device=q0.device)
    b = Interval(zero, zero + max(B - 1, 0))
    h = Interval(zero, zero + max(H - 1, 0))
    q = Interval(q0.view(-1, 1), q1.view(-1, 1))  # (nq, 1)
    kv = Interval(k0.view(1, -1), k1.view(1, -1))  # (1, nk)
    try:
        out = _truth(mask_mod(b, h, q, kv))
    except Unsupported:
        return None
    except (TypeError, RuntimeError, IndexError, AttributeError, ValueError):  # the stand-ins cannot take part
        return None
    shape = (q0.shape[0], k0.shape[0])
    # on the tiles' device even when the mod returns a constant made elsewhere (torch.tensor(True) is on the CPU)
    mt = torch.broadcast_to(out.maybe_true.to(q0.device), shape)
    mf = torch.broadcast_to(out.maybe_false.to(q0.device), shape)
    return (mt.to(torch.int8) + (~mf).to(torch.int8)).contiguous()
