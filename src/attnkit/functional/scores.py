"""The scoring functions, re-exported where users of ``attnkit.functional`` look for them; they live in
:mod:`attnkit.scores` (the shared vocabulary, below the kernels)."""

from attnkit.scores import __all__, _same_dim, additive, concat, dot, gaussian, general, scaled_dot  # noqa: F401
