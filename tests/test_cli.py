"""The command line: help lists every recipe, python -m works, unknown commands fail clearly.

(tqdm is not in the light-import list: torch itself imports it through torch.hub when it is installed.)
"""

import subprocess
import sys

import pytest

from attnkit.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out
    for env in ("ATTNKIT_NATIVE=0", "ATTNKIT_CACHE", "ATTNKIT_NATIVE_POOL_MB"):  # the compiled kernel's switches
        assert env in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_python_dash_m_and_core_import_stay_light():
    code = (
        "import sys, attnkit, attnkit.nn, attnkit.functional, attnkit.masks;"
        "heavy = [m for m in ('matplotlib', 'sklearn', 'sacrebleu', 'safetensors', 'scipy') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    res = subprocess.run([sys.executable, "-m", "attnkit", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "translate" in res.stdout
