"""Convergence of the two noise families (issue #12): the embedded default (plain ``kseed-fed``
settings) for several run seeds each with --noise gaussian and --noise rademacher; the final held-out
loss of every run, the two means and their ratio.

    python bench/convergence_noise.py                      # 5 seeds x 2 families, the full default
    python bench/convergence_noise.py --seeds 3 --rounds 3 --local-steps 20 --json out.json

Writes a JSON record (--json) and prints a markdown table.  Each run is the CLI in this process
(``kseed.cli.main``) into a temporary directory; its summary.json gives ``eval_loss_last``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

from kseed.config import NOISES


def final_losses(seeds, noise, extra, log=None):
    """({seed: final held-out loss}, {seed: round-0 held-out loss}) of the CLI runs
    ``kseed-fed --seed S --noise NOISE EXTRA``."""
    from kseed.cli import main
    out, start = {}, {}
    with tempfile.TemporaryDirectory(prefix="kseed-conv-") as tmp:
        for s in seeds:
            d = os.path.join(tmp, f"{noise}-{s}")
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # the run's own line: not the table's
                rc = main(["--seed", str(s), "--noise", noise, "--out", d, "--quiet", *extra])
            if rc != 0:
                raise RuntimeError(f"kseed-fed --seed {s} --noise {noise} failed (exit {rc})")
            with open(os.path.join(d, "summary.json")) as f:
                summary = json.load(f)
            out[s] = float(summary["eval_loss_last"])
            start[s] = float(summary["eval_loss_first"])
            if log:
                log(f"{noise} seed {s}: {start[s]:.4f} -> {out[s]:.4f} "
                    f"({time.perf_counter() - t0:.0f}s)")
    return out, start


def compare(seeds, extra, log=None) -> dict:
    """Both families over ``seeds``: per-seed losses, means, and rademacher / gaussian."""
    rec = {"seeds": list(seeds), "extra_args": list(extra), "losses": {}, "mean": {}}
    for noise in NOISES:
        rec["losses"][noise], start = final_losses(seeds, noise, extra, log)
        rec["mean"][noise] = statistics.fmean(rec["losses"][noise].values())
    rec["start_mean"] = statistics.fmean(start.values())  # round 0: w0, the same for both
    rec["ratio"] = rec["mean"]["rademacher"] / rec["mean"]["gaussian"]
    return rec


def table(rec: dict) -> str:
    seeds = rec["seeds"]
    head = "| noise | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |"
    rows = [head, "|---" * (len(seeds) + 2) + "|"]
    for noise in NOISES:
        ls = rec["losses"][noise]
        rows.append(f"| {noise} | " + " | ".join(f"{ls[s]:.4f}" for s in seeds)
                    + f" | {rec['mean'][noise]:.4f} |")
    rows.append(f"\nround-0 held-out loss (both): mean {rec['start_mean']:.4f}; "
                f"rademacher / gaussian mean: {rec['ratio']:.4f} "
                f"({(rec['ratio'] - 1) * 100:+.2f}%)")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5, help="run seeds 1..N (default 5)")
    ap.add_argument("--json", default=None, help="write the record here")
    ap.add_argument("rest", nargs=argparse.REMAINDER,
                    help="further kseed-fed flags after --, e.g. -- --rounds 3 --local-steps 20")
    a, unknown = ap.parse_known_args(argv)
    extra = [x for x in (unknown + a.rest) if x != "--"]
    t0 = time.perf_counter()
    rec = compare(range(1, a.seeds + 1), extra,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    rec["seconds"] = time.perf_counter() - t0
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rec, f, indent=1, sort_keys=True)
        os.replace(tmp, a.json)
    print(table(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
