"""Doors from other libraries onto attnkit's kernels (each one imports its library only when it is used).

- :mod:`attnkit.integrations.transformers`: ``register()`` makes ``"attnkit"`` an attention implementation of
  Hugging Face transformers (``model.set_attn_implementation("attnkit")``).
"""
