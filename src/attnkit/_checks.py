"""Small validation helpers: every user mistake becomes a ValueError/TypeError that names the argument,
says what was expected, what came, and (where one helps) a hint."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def check_tensor(
    name: str,
    x: object,
    *,
    min_ndim: int | None = None,
    ndim: int | Sequence[int] | None = None,
    floating: bool = False,
    boolean: bool = False,
    hint: str = "",
) -> Tensor:
    """Return ``x`` if it is a tensor of the right kind, else raise naming ``name``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}.{_h(hint)}")
    if floating and not (x.is_floating_point()):
        raise TypeError(
            f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64); got {x.dtype}."
            f"{_h(hint or 'convert with .float()')}"
        )
    if boolean and x.dtype != torch.bool:
        raise TypeError(f"{name} must be a boolean tensor (True = may attend); got {x.dtype}.{_h(hint)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions; got shape {tuple(x.shape)}.{_h(hint)}"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(f"{name} must have {want} dimensions; got shape {tuple(x.shape)}.{_h(hint)}")
    return x


def check_broadcast(name: str, shape: Sequence[int], target: Sequence[int], hint: str = "") -> None:
    """Raise unless ``shape`` broadcasts to exactly ``target``."""
    target = tuple(target)
    try:
        out = torch.broadcast_shapes(tuple(shape), target)
    except RuntimeError:
        out = None
    if out != target:
        raise ValueError(
            f"{name} must broadcast to {_dims(target)} = {target}; got {tuple(shape)}.{_h(hint)}"
        )


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} ({value!r}).")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}.")
    return value


def check_probability(name: str, p: object) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1); got {type(p).__name__}.")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{name} must be in [0, 1); got {p}.")
    return float(p)


def _dims(target: tuple[int, ...]) -> str:
    letters = {2: "(L, S)", 3: "(B, L, S)", 4: "(B, H, L, S)"}
    return letters.get(len(target), "the scores' shape")


def _h(hint: str) -> str:
    return f" {hint}" if hint else ""


def check_float(name: str, value: object, *, minimum: float | None = None, maximum: float | None = None,
                min_open: bool = False, max_open: bool = False) -> float:
    """A finite real number in the given range (``min_open``/``max_open``: the bound itself is excluded)."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__} ({value!r}).")
    value = float(value)
    lo = "(" if min_open else "["
    hi = ")" if max_open else "]"
    want = f"{lo}{'-inf' if minimum is None else minimum}, {'inf' if maximum is None else maximum}{hi}"
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number in {want}; got {value}.")
    if minimum is not None and (value < minimum or (min_open and value == minimum)):
        raise ValueError(f"{name} must be in {want}; got {value}.")
    if maximum is not None and (value > maximum or (max_open and value == maximum)):
        raise ValueError(f"{name} must be in {want}; got {value}.")
    return value


def check_choice(name: str, value: object, choices: Sequence[object]) -> object:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}.")
    return value
