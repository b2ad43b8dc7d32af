"""Backend selection for :func:`attnkit.functional.attention`.

``choose`` picks the fastest backend that can serve a request from the mask's structure; ``validate`` checks an
explicitly named backend and says why it cannot serve a request (no silent fallback); ``run`` calls it.
Every backend implements the same contract::

    fn(query, key, value, *, score, mask, bias, normalize, scale, dropout_p, return_weights)
        -> out | (out, weights)

with ``mask`` an :class:`attnkit.masks.Mask` (tensor masks arrive wrapped in ``Dense``) or ``None``.
"""

from __future__ import annotations

from attnkit.kernels.math import math_attention
from attnkit.kernels.sdpa import sdpa_attention
from attnkit.kernels.sdpa import supports as sdpa_supports


def _always(**_) -> None:
    return None


# name -> (implementation, supports(**request) -> None | reason it cannot)
BACKENDS = {
    "math": (math_attention, _always),
    "sdpa": (sdpa_attention, sdpa_supports),
}


def choose(query, key, value, **request) -> str:
    """Name of the backend ``backend="auto"`` uses for this request."""
    if sdpa_supports(**request) is None:
        return "sdpa"
    return "math"


def validate(name: str, query, key, value, **request) -> str:
    """Return ``name`` if that backend can serve the request; raise ``ValueError`` saying why not."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}; got {name!r}.")
    reason = BACKENDS[name][1](query=query, key=key, value=value, **request)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run this request: {reason}.")
    return name


def run(name: str, query, key, value, **kwargs):
    """Run backend ``name``."""
    return BACKENDS[name][0](query, key, value, **kwargs)
