"""Positional math as pure tensor functions: sinusoidal tables, rotary rotation, ALiBi and T5 buckets.

Nothing here owns parameters; the modules in :mod:`attnkit.nn.positional` hold the learned parts (T5 bias
table, learned embeddings) and call these functions.

Letters: ``B`` batch, ``H`` heads, ``L`` query length, ``S`` key length, ``E`` embedding size, ``D`` head size.

Position alignment: when ``L != S`` the queries are the *last* ``L`` positions of the keys (query ``i`` sits at
key position ``i + S - L``), the same bottom-right alignment as :func:`attnkit.masks.causal`.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "sinusoidal_table",
    "apply_rotary",
    "alibi_slopes",
    "alibi_bias",
    "relative_position_bucket",
    "relative_positions",
]


def _check_int(name: str, value, *, minimum: int, hint: str = "") -> int:
    """Return ``value`` as int, or raise naming ``name`` if it is not an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}.{hint}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}.{hint}")
    return value


def _check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def relative_positions(query_len: int, key_len: int, *, device=None) -> torch.Tensor:
    """Key position minus query position, ``j - (i + S - L)``, for every query ``i`` and key ``j``.

    Queries are aligned to the last keys (bottom-right), so ``0`` lies on the diagonal that
    :func:`attnkit.masks.causal` keeps last; negative values are keys in the past.

    Shape:
        returns ``(L, S)`` int64.
    """
    L = _check_int("query_len", query_len, minimum=0)
    S = _check_int("key_len", key_len, minimum=0)
    q_pos = torch.arange(L, device=device) + (S - L)  # (L,)
    k_pos = torch.arange(S, device=device)  # (S,)
    return k_pos[None, :] - q_pos[:, None]  # (L, S)


def sinusoidal_table(
    length: int,
    embed_dim: int,
    *,
    offset: int = 0,
    base: float = 10000.0,
    dtype: torch.dtype | None = None,
    device=None,
) -> torch.Tensor:
    """The fixed sinusoidal positional encoding of Vaswani et al. (2017).

    ``PE[pos, 2i] = sin(pos / base^(2i/E))`` and ``PE[pos, 2i+1] = cos(pos / base^(2i/E))`` for the positions
    ``pos = offset, ..., offset + length - 1``. The angles are computed in float64 and cast at the end, so
    large positions stay accurate in float32. An odd ``embed_dim`` keeps the last sine column.

    Args:
        length: number of positions ``L``.
        embed_dim: model size ``E``.
        offset: first position (for continuing a sequence).
        base: the wavelength base (10000 in the paper).
        dtype: result dtype (default ``torch.get_default_dtype()``).
        device: result device.

    Shape:
        returns ``(L, E)``.

    Raises:
        TypeError / ValueError: ``length``, ``embed_dim``, ``offset`` or ``base`` out of range.

    Paper: https://arxiv.org/abs/1706.03762 (section 3.5)
    """
    L = _check_int("length", length, minimum=0)
    E = _check_int("embed_dim", embed_dim, minimum=1)
    offset = _check_int("offset", offset, minimum=0)
    base = _check_positive_float("base", base)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    pos = torch.arange(offset, offset + L, dtype=torch.float64, device=device)  # (L,)
    two_i = torch.arange(0, E, 2, dtype=torch.float64, device=device)  # (ceil(E/2),)
    # angle = pos / base^(2i/E)
    angle = pos[:, None] / base ** (two_i / E)[None, :]  # (L, ceil(E/2))
    table = torch.empty(L, E, dtype=torch.float64, device=device)  # (L, E)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : E // 2])
    return table.to(dtype)


def apply_rotary(
    x: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    offset: int = 0,
    base: float = 10000.0,
) -> torch.Tensor:
    """Rotate each pair of features ``(x[2i], x[2i+1])`` by the angle ``pos * base^(-2i/D)`` (RoPE).

    In complex form, with ``z_i = x[2i] + j x[2i+1]`` and ``theta_i = base^(-2i/D)``:
    ``z_i' = z_i * exp(j * pos * theta_i)``. Applied to queries and keys, the dot product ``q_m . k_n`` then
    depends only on ``m - n``. This is the interleaved-pair layout of the RoFormer paper (not the
    "rotate half" layout of GPT-NeoX / Llama checkpoints).

    Args:
        x: queries or keys ``(..., L, D)`` with ``D`` even, e.g. ``(B, H, L, D)``.
        positions: integer positions ``(L,)``, or any shape that broadcasts to ``x``'s leading dims
            ``(..., L)`` (for ``x`` ``(B, H, L, D)``: ``(B, 1, L)`` gives each sequence its own positions);
            default ``offset, ..., offset + L - 1``.
        offset: first position when ``positions`` is not given.
        base: frequency base (10000 in the paper).

    Returns:
        the rotated tensor, same shape and dtype as ``x`` (half types are rotated in float32).

    Shape:
        ``x``: ``(..., L, D)`` -> ``(..., L, D)``.

    Raises:
        TypeError / ValueError: ``x`` not a floating tensor of rank >= 2 with even last dim; bad ``positions``,
        ``offset`` or ``base``.

    Paper: https://arxiv.org/abs/2104.09864 (section 3.4)
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (..., L, D), got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.dim() < 2 or x.shape[-1] % 2 != 0:
        raise ValueError(f"x must have shape (..., L, D) with an even head size D, got {tuple(x.shape)}. "
                         "Rotary embedding rotates pairs of features.")
    base = _check_positive_float("base", base)
    L, D = x.shape[-2], x.shape[-1]
    if positions is None:
        offset = _check_int("offset", offset, minimum=0)
        positions = torch.arange(offset, offset + L, device=x.device)  # (L,)
    elif not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be an integer tensor (L,), got {type(positions).__name__}")
    elif positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor, got dtype {positions.dtype}")
    else:
        try:
            fits = torch.broadcast_shapes(positions.shape, x.shape[:-1]) == x.shape[:-1]
        except RuntimeError:
            fits = False
        if positions.dim() == 0 or not fits:
            raise ValueError(f"positions must broadcast to x's leading dims (..., L) = {tuple(x.shape[:-1])}, "
                             f"got shape {tuple(positions.shape)}. For x (B, H, L, D) pass (L,) or (B, 1, L).")
    # rotate in float32 at least (float64 stays float64)
    work = torch.promote_types(x.dtype, torch.float32)
    # theta_i = base^(-2i/D)
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64, device=x.device) / D)  # (D/2,)
    # angles, cos and sin in float64 (cheap: no head or batch dims), so large positions stay accurate
    angle = positions.to(torch.float64)[..., None] * theta  # (..., L, D/2)
    cos, sin = torch.cos(angle).to(work), torch.sin(angle).to(work)  # (..., L, D/2)
    xw = x.to(work)
    x_even, x_odd = xw[..., 0::2], xw[..., 1::2]  # (..., L, D/2)
    # (a + jb)(cos + j sin) = (a cos - b sin) + j (a sin + b cos)
    out_even = x_even * cos - x_odd * sin
    out_odd = x_even * sin + x_odd * cos
    out = torch.stack((out_even, out_odd), dim=-1).flatten(-2)  # (..., L, D)
    return out.to(x.dtype)


def alibi_slopes(num_heads: int, *, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
    """The per-head ALiBi slopes of Press et al. (2022).

    For ``n`` a power of two the slopes are the geometric sequence starting at ``2^(-8/n)`` with that ratio
    (8 heads: 1/2, 1/4, ..., 1/256). Otherwise, with ``p`` the largest power of two below ``n``, the slopes
    are those of ``p`` heads followed by every other slope of ``2p`` heads, ``n - p`` of them (the
    paper's reference code).

    Shape:
        returns ``(H,)``.

    Raises:
        TypeError / ValueError: ``num_heads`` is not an int >= 1.

    Paper: https://arxiv.org/abs/2108.12409 (section 3)
    """
    H = _check_int("num_heads", num_heads, minimum=1)
    dtype = torch.get_default_dtype() if dtype is None else dtype

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 2 ** int(math.floor(math.log2(H)))
    slopes = power_of_two(p)
    if p != H:
        slopes += power_of_two(2 * p)[0::2][: H - p]
    return torch.tensor(slopes, dtype=dtype, device=device)  # (H,)


def alibi_bias(
    slopes: torch.Tensor,
    query_len: int,
    key_len: int | None = None,
    *,
    symmetric: bool = False,
) -> torch.Tensor:
    """The ALiBi additive bias ``-m_h * distance`` for ``attention(..., bias=)``.

    With ``r = j - (i + S - L)`` (key position minus query position, bottom-right aligned):

    - causal form (``symmetric=False``): ``bias = m_h * r``, i.e. ``-m_h * (query pos - key pos)`` as in the
      paper; it grows past the diagonal, so use it together with :func:`attnkit.masks.causal`.
    - symmetric form (``symmetric=True``): ``bias = -m_h * |r|`` for bidirectional attention.

    Args:
        slopes: per-head slopes ``m`` ``(H,)``, e.g. :func:`alibi_slopes`; its dtype and device are used.
        query_len: ``L``.
        key_len: ``S`` (default ``L``).
        symmetric: use ``-m |r|`` instead of ``m r``.

    Shape:
        returns ``(1, H, L, S)``.

    Raises:
        TypeError / ValueError: ``slopes`` is not a floating tensor ``(H,)``; bad lengths.

    Paper: https://arxiv.org/abs/2108.12409
    """
    if not isinstance(slopes, torch.Tensor) or not slopes.is_floating_point():
        raise TypeError(f"slopes must be a floating-point tensor (H,), got {type(slopes).__name__}"
                        + (f" of dtype {slopes.dtype}" if isinstance(slopes, torch.Tensor) else "")
                        + ". Use alibi_slopes(num_heads).")
    if slopes.dim() != 1:
        raise ValueError(f"slopes must have shape (H,), got {tuple(slopes.shape)}")
    key_len = query_len if key_len is None else key_len
    r = relative_positions(query_len, key_len, device=slopes.device).to(slopes.dtype)  # (L, S)
    if symmetric:
        r = -r.abs()
    # bias = m_h * r
    return (slopes[:, None, None] * r[None, :, :])[None]  # (1, H, L, S)


def relative_position_bucket(
    relative_position: torch.Tensor,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> torch.Tensor:
    """Map a relative position (key minus query) to one of ``num_buckets`` buckets, as in T5.

    With ``n = query pos - key pos`` (``-relative_position``): for bidirectional attention half of the buckets
    serve keys after the query (offset by ``num_buckets / 2``) and ``n = |n|``; otherwise keys after the query
    fall into bucket 0 (``n = max(n, 0)``). Of the remaining ``N`` buckets, distances ``n < N/2`` get their own
    bucket ``n``; larger distances share logarithmically wider buckets
    ``N/2 + floor(log(n / (N/2)) / log(max_distance / (N/2)) * (N - N/2))``, capped at ``N - 1``.
    The logarithm is taken in float32, exactly as in the T5 reference code, so buckets match T5 checkpoints.

    Args:
        relative_position: integer tensor of ``key pos - query pos`` (any shape), e.g. from
            :func:`relative_positions`.
        bidirectional: whether keys after the query get their own buckets.
        num_buckets: total number of buckets (32 in T5).
        max_distance: distances from here on share the last bucket (128 in T5).

    Shape:
        same shape as ``relative_position``, int64 in ``[0, num_buckets)``.

    Raises:
        TypeError / ValueError: non-integer ``relative_position``; ``num_buckets`` too small for the mode;
        ``max_distance`` not above the exact range.

    Paper: https://arxiv.org/abs/1910.10683 (section 2.1); reference: mesh_tensorflow
    ``_relative_position_bucket``.
    """
    if not isinstance(relative_position, torch.Tensor):
        raise TypeError(f"relative_position must be an integer tensor, got {type(relative_position).__name__}")
    if relative_position.is_floating_point() or relative_position.is_complex() or (
        relative_position.dtype == torch.bool
    ):
        raise TypeError(f"relative_position must be an integer tensor, got dtype {relative_position.dtype}")
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
    _check_int("num_buckets", num_buckets, minimum=4 if bidirectional else 2,
               hint=" Each direction needs at least 2 buckets.")
    n = -relative_position.long()  # query pos - key pos
    ret = torch.zeros_like(n)
    N = num_buckets
    if bidirectional:
        N = num_buckets // 2
        ret = ret + (n < 0).long() * N
        n = n.abs()
    else:
        n = n.clamp(min=0)
    max_exact = N // 2
    _check_int("max_distance", max_distance, minimum=max_exact + 1,
               hint=f" It must exceed the exact range num_buckets{' / 2' if bidirectional else ''} / 2.")
    is_small = n < max_exact
    # log-spaced buckets for n >= max_exact (n clamped so the unused branch never takes log(0))
    n_large = n.clamp(min=max_exact).float()
    val_if_large = max_exact + (
        torch.log(n_large / max_exact) / math.log(max_distance / max_exact) * (N - max_exact)
    ).long()
    val_if_large = val_if_large.clamp(max=N - 1)
    return ret + torch.where(is_small, n, val_if_large)
