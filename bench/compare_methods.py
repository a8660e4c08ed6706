"""Compare federated methods over run seeds: kseed-fed runs, then one table (compare.md).

    python bench/compare_methods.py                                   # fedkseed, fedmezo, mezo; seeds 1-10
    python bench/compare_methods.py --methods fedmezo,mezo --seeds 1-2 --jobs 2 -- --rounds 2
    python bench/compare_methods.py --methods fedkseed,ferret          # Ferret beside FedKSeed
    python bench/compare_methods.py --out DIR --report-only            # the table from DIR's runs

Each (method, seed) is one `kseed-fed --method M --seed S --out OUT/M/seed-S --threads 1 --quiet`
process (plus the kseed-fed options after `--`, the same for every method: the same data split,
held-out category, evaluation set and metric), --jobs of them at a time, one thread each.  A run whose
summary.json exists is finished and skipped; one with a checkpoint but no summary (a previous call was
stopped) is resumed (--resume).  Every number in compare.md is read from the runs' own files:

  final held-out loss   summary.json eval_loss_last: mean and sd (n - 1) over the seeds
  bytes per client      metrics.jsonl: sum of bytes_down (bytes_up) over the rounds / the messages
                        sent (received), per client per round; and summary.json's totals (mean over
                        seeds)
  rebuild s / round     summary.json rebuild_seconds_this_process / rounds (the server workspace's
                        rebuilds of the global model: evaluation and, in-process, the clients')
  s / round             metrics.jsonl seconds of rounds 1.. (mean)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_METHODS = "fedkseed,fedmezo,mezo"


def parse_seeds(text: str) -> List[int]:
    """'1-10' or '1,3,5' or '1-3,7' -> sorted distinct seeds."""
    out = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        a, sep, b = part.partition("-")
        try:
            lo, hi = int(a), int(b) if sep else int(a)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--seeds: {part!r} is not N or N-M") from None
        if lo < 0 or hi < lo:
            raise argparse.ArgumentTypeError(f"--seeds: {part!r} is not a range of seeds >= 0")
        out.update(range(lo, hi + 1))
    if not out:
        raise argparse.ArgumentTypeError("--seeds: no seeds")
    return sorted(out)


def run_dir(out: str, method: str, seed: int) -> str:
    return os.path.join(out, method, f"seed-{seed}")


def state(d: str) -> str:
    """done | partial (a checkpoint to resume) | new."""
    if os.path.isfile(os.path.join(d, "summary.json")):
        return "done"
    if os.path.isfile(os.path.join(d, "checkpoint.json")):
        return "partial"
    return "new"


def launch(method: str, seed: int, d: str, extra: List[str]) -> dict:
    """Run (or resume) one kseed-fed; {method, seed, dir, rc, seconds, log}."""
    st = state(d)
    if st == "done":
        return {"method": method, "seed": seed, "dir": d, "rc": 0, "skipped": True}
    cmd = [sys.executable, "-m", "kseed", "--out", d, "--quiet", "--threads", "1"]
    cmd += ["--resume"] if st == "partial" else ["--method", method, "--seed", str(seed), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "python")] +
                                        [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    os.makedirs(os.path.dirname(d), exist_ok=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    with open(d + ".log", "w", encoding="utf-8") as f:
        f.write(" ".join(cmd) + "\n" + res.stdout + res.stderr)
    return {"method": method, "seed": seed, "dir": d, "rc": res.returncode,
            "seconds": time.perf_counter() - t0, "log": d + ".log"}


def _mean_sd(xs: List[float]):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def read_run(d: str) -> Optional[dict]:
    """The numbers of one finished run (None if it has not finished)."""
    if state(d) != "done":
        return None
    with open(os.path.join(d, "summary.json"), encoding="utf-8") as f:
        s = json.load(f)
    with open(os.path.join(d, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rounds = [r for r in rows if r.get("round", 0) >= 1]
    sent = sum(len(r.get("bytes_down_per_client") or {}) for r in rounds)
    got = sum(len(r.get("bytes_up_per_client") or {}) for r in rounds)
    n = max(1, s.get("rounds") or len(rounds))
    rb = s.get("rebuild_seconds_this_process")
    return {
        "loss": s.get("eval_loss_last"), "loss_first": s.get("eval_loss_first"),
        "down_per_client_round": sum(r.get("bytes_down") or 0 for r in rounds) / max(1, sent),
        "up_per_client_round": sum(r.get("bytes_up") or 0 for r in rounds) / max(1, got),
        "down_total": s.get("bytes_down_total"), "up_total": s.get("bytes_up_total"),
        "rebuild_s_per_round": None if rb is None else rb / n,
        "s_per_round": (sum(r.get("seconds") or 0 for r in rounds) / len(rounds)) if rounds else None,
        "rounds": s.get("rounds"), "config": _config(d),
    }


def _config(d: str) -> dict:
    try:
        with open(os.path.join(d, "checkpoint.json"), encoding="utf-8") as f:
            return json.load(f)["server"]["config"]
    except (OSError, KeyError, ValueError):
        return {}


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def report(out: str, methods: List[str], seeds: List[int]) -> str:
    """compare.md's text (also written to OUT/compare.md)."""
    lines = ["# Methods compared", "",
             f"Runs in `{os.path.abspath(out)}`: seeds {seeds[0]}..{seeds[-1]} ({len(seeds)}), written "
             f"by bench/compare_methods.py on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             "every number read from the runs' metrics.jsonl / summary.json.", "",
             "| method | runs | final held-out loss (mean +- sd) | first | bytes down / client / round "
             "| bytes up / client / round | bytes down total | bytes up total | rebuild s / round "
             "| s / round |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    settings = {}
    for m in methods:
        runs = [r for r in (read_run(run_dir(out, m, s)) for s in seeds) if r is not None]
        if not runs:
            lines.append(f"| {m} | 0 | - | - | - | - | - | - | - | - |")
            continue
        mean, sd = _mean_sd([r["loss"] for r in runs])
        first, _ = _mean_sd([r["loss_first"] for r in runs])
        col = {k: _mean_sd([r[k] for r in runs])[0] for k in
               ("down_per_client_round", "up_per_client_round", "down_total", "up_total",
                "rebuild_s_per_round", "s_per_round")}
        lines.append(
            f"| {m} | {len(runs)} | {_fmt(mean, '.4f')} +- {_fmt(sd, '.4f')} | {_fmt(first, '.4f')} "
            f"| {_fmt(col['down_per_client_round'], ',.0f')} | {_fmt(col['up_per_client_round'], ',.0f')} "
            f"| {_fmt(col['down_total'], ',.0f')} | {_fmt(col['up_total'], ',.0f')} "
            f"| {_fmt(col['rebuild_s_per_round'], '.4f')} | {_fmt(col['s_per_round'], '.2f')} |")
        cfg = runs[0]["config"]
        keys = ("rounds", "num_clients", "clients_per_round", "local_steps", "lr", "eps",
                "batch_size", "num_seeds", "sampling", "noise", "optimizer", "n_accum",
                "grad_clip", "server_lr", "seed_clip", "dataset", "eval_size")
        from kseed.methods import get
        from kseed.methods.base import METHOD_FIELDS
        unused = (METHOD_FIELDS - get(m).options) | get(m).ignores  # not this method's settings
        settings[m] = ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg and
                                (k not in unused or k in get(m).fixed))
    lines += ["", "Settings (the first run's checkpoint; the seed varies):", ""]
    lines += [f"- {m}: {s}" for m, s in settings.items()]
    text = "\n".join(lines) + "\n"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.md"), "w", encoding="utf-8") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--methods", default=DEFAULT_METHODS,
                    help=f"comma-separated method names (default: {DEFAULT_METHODS})")
    ap.add_argument("--seeds", type=parse_seeds, default=parse_seeds("1-10"),
                    help="run seeds: N-M or a comma list (default: 1-10)")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="runs at a time, one thread each (default: cores - 1)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "compare_methods"),
                    help="where the runs and compare.md go (default: runs/compare_methods)")
    ap.add_argument("--report-only", action="store_true", help="write compare.md from the runs there")
    a = ap.parse_args(argv)
    sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
    from kseed import methods as registry
    names = [m.strip() for m in a.methods.split(",") if m.strip()]
    for m in names:
        if m not in registry.NAMES:
            ap.error(f"--methods: unknown method {m!r}; choose from {', '.join(registry.NAMES)}")
    if a.jobs < 1:
        ap.error("--jobs must be >= 1")
    if not a.report_only:
        todo = [(m, s) for m in names for s in a.seeds]
        skipped = sum(state(run_dir(a.out, m, s)) == "done" for m, s in todo)
        print(f"compare_methods: {len(todo)} runs ({skipped} finished before), {a.jobs} at a time",
              file=sys.stderr)
        failed: Dict[str, str] = {}
        with ThreadPoolExecutor(a.jobs) as pool:
            for r in pool.map(lambda ms: launch(ms[0], ms[1], run_dir(a.out, *ms), extra), todo):
                if r["rc"]:
                    failed[f"{r['method']} seed {r['seed']}"] = r["log"]
                elif not r.get("skipped"):
                    print(f"  {r['method']} seed {r['seed']}: {r['seconds']:.1f} s", file=sys.stderr)
        for what, log in failed.items():
            print(f"compare_methods: {what} failed; see {log}", file=sys.stderr)
        if failed:
            report(a.out, names, a.seeds)
            return 1
    print(report(a.out, names, a.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
