"""``attnkit bench``: timing of attnkit's kernels against their anchors (see :mod:`attnkit.bench.cli`)."""
