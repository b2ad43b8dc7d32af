"""attnkit: attention mechanisms for PyTorch.

The core import is light (torch only). ``attnkit.functional`` holds pure tensor functions, ``attnkit.masks``
structured masks, ``attnkit.nn`` modules; recipes live in ``attnkit.tasks`` and run from the ``attnkit`` command.
"""

__version__ = "0.1.0"

from attnkit import functional, masks  # noqa: E402,F401

__all__ = ["functional", "masks", "__version__"]
