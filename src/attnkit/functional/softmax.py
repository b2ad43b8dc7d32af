"""The normalizers, re-exported where users of ``attnkit.functional`` look for them; they live in
:mod:`attnkit.softmax` (the shared vocabulary, below the kernels)."""

from attnkit.softmax import NORMALIZERS, __all__, get_normalizer, masked_softmax  # noqa: F401
