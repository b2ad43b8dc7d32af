"""Pure tensor functions: scores, masked softmax, attention, positional math. No parameters live here.

Shapes follow the SDPA layout: ``(..., L, D)`` for queries, ``(..., S, D)`` for keys and values, scores and
weights ``(..., L, S)``.
"""

from attnkit.functional.attention import attention
from attnkit.functional.scores import additive, concat, dot, gaussian, general, scaled_dot
from attnkit.functional.softmax import NORMALIZERS, masked_softmax

_POSITIONAL = ("sinusoidal_table", "apply_rotary", "alibi_slopes", "alibi_bias", "relative_position_bucket")

__all__ = [
    "attention", "dot", "scaled_dot", "general", "additive", "concat", "gaussian", "masked_softmax",
    "NORMALIZERS", *_POSITIONAL,
]


def __getattr__(name: str):
    if name in _POSITIONAL:
        from attnkit.functional import positional

        return getattr(positional, name)
    raise AttributeError(f"module 'attnkit.functional' has no attribute {name!r}")
