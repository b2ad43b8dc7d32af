"""Interchangeable implementations of :func:`attnkit.functional.attention` (see :mod:`.dispatch`)."""
