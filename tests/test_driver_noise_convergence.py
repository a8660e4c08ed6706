"""Convergence of the Rademacher family against the Gaussian (issue #12), reduced.

The full comparison (bench/convergence_noise.py: plain kseed-fed, 10 rounds, seeds 1..20 per family;
record in bench/convergence_noise_full.json, tables in README.md and docs/DRIVER.md) takes 20 minutes
with two runs at a time on the 2-core machine.  This test runs the same comparison (the same code,
bench/convergence_noise.compare) on 3 seeds with 3 rounds of 40 local steps and no Rouge-L (about 6 x
12 s): both families must really train (MIN_DROP), and Rademacher's mean final held-out loss must lie
within TOL of Gaussian's.

TOL is what the full measurement can resolve, not the issue's 3 %: on the full run (seeds 1..20) the
per-seed ratio rademacher / gaussian of the final held-out loss has a standard deviation of 0.146, so a
mean over 3 seeds carries a standard error of 0.085 and TOL is two of them.  The full run's numbers:
seeds 1..5 +1.6 % (the issue's comparison, within its 3 %), seeds 1..20 +2.0 % with a paired 95 %
interval of -4.9 % .. +9.0 %; this reduced one gave +0.3 %.  See docs/DRIVER.md, "Noise families".
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from convergence_noise import compare  # noqa: E402

REDUCED = ["--rounds", "3", "--local-steps", "40", "--rouge-size", "0"]
SEEDS = (1, 2, 3)
TOL = 0.17  # 2 x 0.146 / sqrt(3): two standard errors of a 3-seed mean ratio (docstring)
MIN_DROP = 0.05  # both families must lower the held-out loss by 5 % at least, or the comparison is void


@pytest.mark.slow
def test_rademacher_converges_like_gaussian(capsys):
    rec = compare(SEEDS, REDUCED)
    capsys.readouterr()
    g, r = rec["mean"]["gaussian"], rec["mean"]["rademacher"]
    start = rec["start_mean"]
    for noise, m in (("gaussian", g), ("rademacher", r)):
        assert m < start * (1 - MIN_DROP), (noise, start, m)
    assert abs(r / g - 1) <= TOL, rec
