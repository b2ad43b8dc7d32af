"""`attnkit tour` runs every worked example, and the numbers it prints hold."""

import re

from attnkit.cli import main


def test_tour_runs_and_its_claims_hold(capsys):
    assert main(["tour"]) == 0
    out = capsys.readouterr().out
    for n in range(1, 12):
        assert f"== {n}." in out
    # multi-head attention equals torch's after from_torch; recurrent linear attention equals the parallel form
    mha = float(re.search(r"max \|attnkit - torch\| = ([0-9.e+-]+)", out).group(1))
    rnn = float(re.search(r"max \|recurrent - parallel\| = ([0-9.e+-]+)", out).group(1))
    assert mha < 1e-5 and rnn < 1e-5
    # Nadaraya-Watson: the Gaussian kernel beats plain averaging on seed 003's toy curve
    errs = dict(re.findall(r"(average|gaussian)\s+pooling: mean squared error vs the true curve = ([0-9.]+)", out))
    assert float(errs["gaussian"]) < float(errs["average"])
