"""Build and load attnkit's compiled CPU tile kernel (``kernels/csrc/tile_attention.cpp``), once per machine.

The extension is compiled just in time on first use (and by ``make setup``, ``python -m attnkit.kernels._native
--build``) with PyTorch's own tooling (``torch.utils.cpp_extension.load``: the installed torch's headers and
libraries, nothing fetched), into a cache directory keyed by the torch version and the source hash:
``$ATTNKIT_CACHE/ext/<key>`` (default ``~/.cache/attnkit/ext/<key>``). Where it cannot be built (no C++
compiler, no ninja, a failed build) or ``ATTNKIT_NATIVE=0``, :func:`extension` returns None after one warning,
and the backends fall back to the pure-PyTorch kernels.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

_SOURCE = Path(__file__).with_name("csrc") / "tile_attention.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp"]  # built on the machine that runs it: its own vector unit

log = logging.getLogger("attnkit.native")
_state: dict = {}


def cache_dir() -> Path:
    """Build directory of this torch version and this source (created on demand)."""
    import torch

    root = Path(os.environ.get("ATTNKIT_CACHE") or Path.home() / ".cache" / "attnkit")
    # -march=native: the binary is this CPU's; a home directory shared by other CPUs gets one build per CPU kind
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_FLAGS).encode() + _cpu_kind().encode()).hexdigest()[:16]
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{digest}"
    return root / "ext" / tag.replace("+", "_")


def _cpu_kind() -> str:
    """The machine and its instruction-set flags (what ``-march=native`` compiled for)."""
    import platform

    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


def _why_not() -> str | None:
    """Why the extension cannot be built here, or None."""
    if os.environ.get("ATTNKIT_NATIVE", "1") == "0":
        return "ATTNKIT_NATIVE=0"
    if sys.platform != "linux":
        return f"it is built on Linux only (this is {sys.platform})"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler found (CXX={cxx!r})"
    from torch.utils.cpp_extension import is_ninja_available

    if shutil.which("ninja") is None:  # the pip package's binary, when its venv is not on PATH (make setup)
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _build():
    from torch.utils.cpp_extension import load

    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    return load(name="attnkit_native", sources=[str(_SOURCE)], build_directory=str(build),
                extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], verbose=False)


def _check_pool_env() -> None:
    """``ATTNKIT_NATIVE_POOL_MB`` (the kernel's output cache, read by the C++ once) must be whole MiB >= 0."""
    raw = os.environ.get("ATTNKIT_NATIVE_POOL_MB")
    if raw is not None and not raw.strip().isdigit():
        raise ValueError(f"ATTNKIT_NATIVE_POOL_MB must be a whole number of MiB, 0 or more (0 turns the native "
                         f"kernel's output cache off; unset means 256); got {raw!r}.")


def extension():
    """The loaded extension module, or None (with one warning per process) where it cannot be built."""
    _check_pool_env()
    if "module" in _state:
        return _state["module"]
    reason = _why_not()
    module = None
    if reason is None:
        try:
            module = _build()
        except Exception as err:  # noqa: BLE001 (a compiler failure of any kind means: use the fallback)
            reason = f"building it failed ({type(err).__name__}: {str(err).strip().splitlines()[-1][:200]})"
    if module is None:
        warnings.warn(f"attnkit: the compiled CPU kernel is not available: {reason}; using the pure-PyTorch "
                      "kernels.", RuntimeWarning, stacklevel=3)
        log.info("native kernel unavailable: %s", reason)
    _state["module"] = module
    _state["reason"] = reason
    return module


def available() -> bool:
    """True when the compiled kernel is (or can be) loaded; builds it on first call."""
    return extension() is not None


def _main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m attnkit.kernels._native",
                                     description="Build attnkit's compiled CPU kernel into its cache.")
    parser.add_argument("--build", action="store_true", help="build (or find) the extension and say where")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = available()
    if ok:
        sys.stdout.write(f"attnkit native kernel ready in {cache_dir()}\n")
    else:
        sys.stdout.write(f"{caught[0].message if caught else 'attnkit native kernel not built'}\n")
    return 0  # never fails a setup: without it attnkit uses its pure-PyTorch kernels


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
