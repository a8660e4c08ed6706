"""Convergence of the two noise families (issue #12): the embedded default (plain ``kseed-fed``
settings) for several run seeds each with --noise gaussian and --noise rademacher; the final held-out
loss of every run, the two means and their ratio.

    python bench/convergence_noise.py                      # 5 seeds x 2 families, the full default
    python bench/convergence_noise.py --seeds 1-20 --jobs 2 --json out.json  # two runs at a time
    python bench/convergence_noise.py --seeds 3 -- --rounds 3 --local-steps 20 --lr 5e-5

Writes a JSON record (--json) and prints a markdown table.  Each run is the CLI in this process
(``kseed.cli.main``) into a temporary directory; its summary.json gives ``eval_loss_last``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

from kseed.config import NOISES


def one_run(seed, noise, extra, tmp):
    """(final held-out loss, round-0 held-out loss, seconds) of ``kseed-fed --seed SEED --noise NOISE
    EXTRA`` run in this process into a directory under ``tmp``."""
    from kseed.cli import main
    d = os.path.join(tmp, f"{noise}-{seed}")
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the run's own line: not the table's
        rc = main(["--seed", str(seed), "--noise", noise, "--out", d, "--quiet", *extra])
    if rc != 0:
        raise RuntimeError(f"kseed-fed --seed {seed} --noise {noise} failed (exit {rc})")
    with open(os.path.join(d, "summary.json")) as f:
        summary = json.load(f)
    return (float(summary["eval_loss_last"]), float(summary["eval_loss_first"]),
            time.perf_counter() - t0)


def _one_run_star(args):
    return args[:2], one_run(*args)


def _runs(seeds, noises, extra, log, jobs):
    """{noise: ({seed: final held-out loss}, {seed: round-0 held-out loss})} of the CLI runs
    ``kseed-fed --seed S --noise NOISE EXTRA``; ``jobs`` runs at a time (each in its own process when
    jobs > 1: the embedded model trains on one thread)."""
    out = {n: ({}, {}) for n in noises}
    with tempfile.TemporaryDirectory(prefix="kseed-conv-") as tmp:
        work = [(s, n, list(extra), tmp) for n in noises for s in seeds]

        def record(key, res):
            (s, n), (last, first, sec) = key, res
            out[n][0][s], out[n][1][s] = last, first
            if log:
                log(f"{n} seed {s}: {first:.4f} -> {last:.4f} ({sec:.0f}s)")

        if jobs <= 1:
            for w in work:
                record(w[:2], one_run(*w))
        else:
            ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
            with ctx.Pool(jobs, maxtasksperchild=1) as pool:
                for key, res in pool.imap_unordered(_one_run_star, work):
                    record(key, res)
    return {n: ({s: out[n][0][s] for s in seeds}, {s: out[n][1][s] for s in seeds})
            for n in noises}


# two-sided 97.5 % quantiles of Student's t, df 1..30 (beyond: the normal's 1.96)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)


def paired_stats(g: dict, r: dict) -> dict:
    """Paired statistics of the per-seed final losses (the two runs of a seed share data, held-out set
    and client schedule; only the noise family differs): the relative difference of the means
    (mean r - mean g) / mean g with a 95 % t interval from the per-seed differences, and the per-seed
    ratios' mean and standard deviation."""
    seeds = sorted(g)
    n = len(seeds)
    d = [r[s] - g[s] for s in seeds]
    mg = statistics.fmean(g.values())
    rel = statistics.fmean(d) / mg
    out = {"n": n, "rel_diff": rel,
           "ratio_mean": statistics.fmean(r[s] / g[s] for s in seeds)}
    if n >= 2:
        se = statistics.stdev(d) / math.sqrt(n) / mg
        t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
        out.update(rel_diff_se=se, rel_diff_ci95=[rel - t * se, rel + t * se],
                   ratio_sd=statistics.stdev(r[s] / g[s] for s in seeds))
    return out


def compare(seeds, extra, log=None, jobs=1, noises=NOISES) -> dict:
    """The families (both by default) over ``seeds``: per-seed losses, means, and with both,
    rademacher / gaussian and the paired stats."""
    seeds = list(seeds)
    rec = {"seeds": seeds, "extra_args": list(extra), "losses": {}, "mean": {}}
    runs = _runs(seeds, tuple(noises), extra, log, jobs)
    for noise in noises:
        rec["losses"][noise], start = runs[noise]
        rec["mean"][noise] = statistics.fmean(rec["losses"][noise].values())
    rec["start_mean"] = statistics.fmean(start.values())  # round 0: w0, the same for every family
    if set(noises) == set(NOISES):
        rec["ratio"] = rec["mean"]["rademacher"] / rec["mean"]["gaussian"]
        rec["paired"] = paired_stats(rec["losses"]["gaussian"], rec["losses"]["rademacher"])
    return rec


def table(rec: dict) -> str:
    seeds = rec["seeds"]
    head = "| noise | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |"
    rows = [head, "|---" * (len(seeds) + 2) + "|"]
    for noise in rec["losses"]:
        ls = rec["losses"][noise]
        rows.append(f"| {noise} | " + " | ".join(f"{ls[s]:.4f}" for s in seeds)
                    + f" | {rec['mean'][noise]:.4f} |")
    rows.append(f"\nround-0 held-out loss (every family): mean {rec['start_mean']:.4f}")
    if "ratio" in rec:
        rows[-1] += (f"; rademacher / gaussian mean: {rec['ratio']:.4f} "
                     f"({(rec['ratio'] - 1) * 100:+.2f}%)")
    p = rec.get("paired", {})
    if "rel_diff_ci95" in p:
        lo, hi = p["rel_diff_ci95"]
        rows.append(f"paired over {p['n']} seeds: (mean r - mean g) / mean g = "
                    f"{p['rel_diff'] * 100:+.2f}% (95% CI {lo * 100:+.2f}% .. {hi * 100:+.2f}%); "
                    f"per-seed ratio {p['ratio_mean']:.4f} +- {p['ratio_sd']:.4f} (sd)")
    return "\n".join(rows)


def _seed_list(text: str) -> list:
    """'N' -> 1..N, 'A-B' -> A..B, 'a,b,c' -> [a, b, c]."""
    try:
        if "," in text:
            seeds = [int(x) for x in text.split(",") if x.strip()]
        elif "-" in text.strip("-"):
            a, b = text.split("-", 1)
            seeds = list(range(int(a), int(b) + 1))
        else:
            seeds = list(range(1, int(text) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a seed count, range or list: {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"an empty or repeating seed list: {text!r}")
    return seeds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=_seed_list, default=_seed_list("5"),
                    help="run seeds: N (1..N), A-B, or a comma list (default 5: 1..5)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="runs at a time, each its own process on one thread (default 1)")
    ap.add_argument("--noises", default=",".join(NOISES),
                    help=f"comma list of families (default {','.join(NOISES)}: both, and their ratio)")
    ap.add_argument("--json", default=None, help="write the record here")
    ap.add_argument("rest", nargs=argparse.REMAINDER,
                    help="further kseed-fed flags after --, e.g. -- --rounds 3 --local-steps 20")
    a, unknown = ap.parse_known_args(argv)
    extra = [x for x in (unknown + a.rest) if x != "--"]
    t0 = time.perf_counter()
    if a.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {a.jobs}")
    noises = [n for n in a.noises.split(",") if n]
    if not noises or any(n not in NOISES for n in noises) or len(set(noises)) != len(noises):
        ap.error(f"--noises must name distinct families of {', '.join(NOISES)}, got {a.noises!r}")
    rec = compare(a.seeds, extra, log=lambda m: print(m, file=sys.stderr, flush=True), jobs=a.jobs,
                  noises=noises)
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
