"""Compare federated methods over run seeds: kseed-fed runs, then one table (compare.md) and two plots.

    python bench/compare_methods.py                                   # every method; seeds 1-5
    python bench/compare_methods.py --seeds 1-10 --jobs 2             # the README's table and plots
    python bench/compare_methods.py --methods fedmezo,mezo --seeds 1-2 --jobs 2 -- --rounds 2
    python bench/compare_methods.py --methods fedkseed,ferret -- --model DIR --data dolly.jsonl
    python bench/compare_methods.py --out DIR --report-only            # compare.md from DIR's runs

Defaults: --methods all (every method of kseed's registry, kseed.methods.NAMES, then the aliases
kseed-fed's --method takes, kseed.methods.ALIASES, e.g. fedkseed-pro = fedkseed --sampling pro; a
method added to the registry is compared without a change here), --seeds 1-5, --jobs cores - 1, --out
runs/compare_methods.  Each method runs at kseed-fed's defaults (`kseed-fed --help`; `--help` here lists
each method's settings): 10 rounds, 8 clients, 2 a round (MeZO: one client holding all the data), the
embedded model and data, held-out category the 8th, 64 held-out examples for the loss and 16 for
Rouge-L (greedy, 32 new tokens, once at the end: kseed-fed's default, so every run records it;
summary.json rouge_seconds: 1.6 to 15 s a run on the embedded model, on a loaded 2-core machine);
the zeroth-order methods (fedkseed, fedkseed-pro, fedmezo, mezo) tau = 100 steps of batch 8, lr 5e-5,
eps 1e-3, K = 256 (FedKSeed); Ferret tau = 10 SGD steps of batch 8, lr 0.03, K = 256, server lr 1, seed
clip 10; a method's own defaults (kseed.methods.<name>.METHOD) otherwise.  compare.md lists every
method's settings as its runs' checkpoints record them, and how each default was tuned (TUNING below:
FedKSeed's lr over 3 values x 20 seeds, Ferret's over 3 values x 2 seeds of 4 rounds, FedIT's over 3
values x 1 seed, the other methods' not on their own; not the same budget, and compare.md says so).

Each (method, seed) is one `kseed-fed --method M --seed S --out OUT/M/seed-S --threads 1 --quiet`
process plus the kseed-fed options after `--` (the same data split, held-out category, evaluation set
and metric for every method), --jobs of them at a time, one thread each.  An option after `--` goes to
every method that takes it: a method that does not (MeZO and --num-clients, Ferret and --eps,
fedkseed-pro and --sampling) runs without it, and a line on stderr says so.  A run whose summary.json
exists is finished and skipped; one with a checkpoint but no summary (a previous call was stopped) is
resumed (--resume).

Every number in compare.md is read from the runs' own files (the mean over the seeds' runs unless
said otherwise):

  runs                  the finished runs (summary.json); "(k diverged)": k of them ended with a
                        final loss that is not finite (summary.json diverged), left out of the means
  final held-out loss   summary.json eval_loss_last (the final model's): mean and sd (n - 1)
  first                 summary.json eval_loss_first (the base model's, round 0)
  Rouge-L               summary.json rouge_l (the final model's): mean and sd (n - 1)
  bytes / client / round  metrics.jsonl: sum of bytes_down (bytes_up) over rounds 1.. / the messages
                        sent (received) in them (bytes_down_per_client, bytes_up_per_client)
  bytes total           summary.json bytes_down_total, bytes_up_total (all clients, all rounds)
  s / round             metrics.jsonl seconds of rounds 1.. (sampling, the clients' local work,
                        aggregation and the held-out evaluation), mean over the rounds
  rebuild s / round     summary.json rebuild_seconds_this_process / rounds (the server workspace's
                        rebuilds of the global model: evaluation and, in-process, the clients')
  peak RSS MiB          summary.json peak_rss_bytes_this_process (and peak_cuda_bytes_this_process on
                        CUDA): the peak memory of the kseed-fed process, which in-process holds the
                        server, the evaluation and every client (one client's alone is not measured)

The plots (next to compare.md), one line per method, the mean over its seeds at each evaluated round,
with a band from the lowest to the highest seed (runs that diverged left out):
  loss_vs_bytes.png     held-out loss (metrics.jsonl eval_loss) against the cumulative bytes one
                        sampled client moves (down + up per client per round, summed over rounds 1..r;
                        log x axis, so round 0 is not drawn)
  loss_vs_time.png      held-out loss against the cumulative seconds of rounds 1..r (metrics.jsonl
                        seconds; process start-up and the final Rouge-L excluded)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (os.path.join(ROOT, "python"), ROOT):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from kseed import methods as registry  # noqa: E402 (the worktree's kseed, first on the path)
from kseed.config import FedConfig  # noqa: E402
from kseed.methods.base import METHOD_FIELDS  # noqa: E402

DEFAULT_SEEDS = "1-5"
PLOTS = ("loss_vs_bytes.png", "loss_vs_time.png")
# kseed-fed options this tool sets itself for every run
OWN_OPTIONS = ("--method", "--seed", "--out", "--resume", "--quiet", "--threads")
# Shared settings shown for every method (then the method's own options, in FedConfig's order)
SHOWN = ("rounds", "num_clients", "clients_per_round", "model", "data", "dataset", "dtype",
         "eval_category", "eval_size", "rouge_size")

# How each method's default settings were chosen (bench/RESULTS.md): the budgets differ.
_ZO_LR = ("lr 5e-5 is FedKSeed's: the lowest mean final held-out loss of lr 3e-5, 5e-5 and 1e-4, "
          "20 seeds each, 10 rounds (60 runs; bench/RESULTS.md \"Convergence, 20 seeds, and the "
          "default learning rate\", bench/convergence_lr_sweep.json)")
TUNING = {
    "fedkseed": _ZO_LR + "; tau, eps, K and the batch are the paper's / kseed-fed's defaults, "
                         "not swept here",
    "fedkseed-pro": "not tuned on its own: FedKSeed's settings (" + _ZO_LR + ")",
    "fedmezo": "not tuned on its own: FedKSeed's lr, eps, tau and batch (" + _ZO_LR + ")",
    "mezo": "not tuned on its own: FedKSeed's lr, eps, tau and batch (" + _ZO_LR + ")",
    "ferret": "lr 0.03 is the lowest mean final held-out loss of lr 0.003, 0.01 and 0.03, 2 seeds "
              "each, 4 rounds (6 runs; bench/RESULTS.md \"Issue #19: Ferret\"); 0.03 is the largest "
              "lr tried, so a larger one may be better; tau = 10, K, the batch, server lr and seed "
              "clip not swept",
    "fedit": "lr 3e-3 is the lowest final held-out loss of lr 3e-4, 1e-3 and 3e-3 on one seed "
             "(42), 10 rounds (3 runs; docs/DRIVER.md \"FedIT\"); 3e-3 is the largest lr tried; "
             "rank, alpha, tau = 10 and the batch not swept",
    "fedpipe": "not tuned on its own: FedIT's lr, tau and LoRA settings; --select-fraction 0.5 and "
               "--calib-size 16 not swept",
}
TUNING_NOTE = ("The tuning budgets were not the same: FedKSeed's lr had 60 runs, Ferret's 6, FedIT's "
               "3, and the other methods none of their own; a method whose lr was not swept may be "
               "handicapped by it.")


# ------------------------------------------------------------------------------- the methods
def all_methods() -> List[str]:
    """Every registered method, each alias right after the method it stands for."""
    out: List[str] = []
    for name in registry.NAMES:
        out.append(name)
        out += [a for a, (base, _) in registry.ALIASES.items() if base == name]
    out += [a for a in registry.ALIASES if a not in out]
    return out


def resolve(name: str) -> Tuple[object, dict]:
    """(the registered base.Method, the FedConfig fields the alias sets) of a method or alias name."""
    if name in registry.ALIASES:
        base, sets = registry.ALIASES[name]
        return registry.get(base), dict(sets)
    return registry.get(name), {}


def unused_fields(name: str) -> set:
    """The FedConfig fields that kseed-fed --method NAME refuses or fixes (an alias fixes its own)."""
    m, sets = resolve(name)
    return (METHOD_FIELDS - m.options) | set(m.ignores) | set(m.fixed) | set(sets)


def parse_methods(text: str) -> List[str]:
    """'all' or a comma list of method names and aliases (ValueError naming the known ones)."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if names == ["all"]:
        return all_methods()
    known = all_methods()
    for m in names:
        if m not in known:
            raise ValueError(f"--methods: unknown method {m!r}; choose from all, {', '.join(known)}")
    if not names:
        raise ValueError("--methods: no method")
    return list(dict.fromkeys(names))


def _option_table() -> Dict[str, Tuple[str, bool]]:
    """kseed-fed's option string -> (FedConfig field, takes a value)."""
    from kseed import cli
    table = {f: (name, True) for flags, name, _, _ in cli._OPTIONS for f in flags}
    table.update({flag: (name, False) for flag, name, _ in cli._FLAGS})
    return table


def method_args(name: str, extra: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(the options of ``extra`` that method ``name`` takes, the flags dropped for it)."""
    table, unused = _option_table(), unused_fields(name)
    kept: List[str] = []
    dropped: List[str] = []
    i = 0
    while i < len(extra):
        tok = extra[i]
        flag = tok.split("=", 1)[0]
        field, takes = table.get(flag, (None, False))
        n = 2 if takes and "=" not in tok and i + 1 < len(extra) else 1
        if field is not None and field in unused:
            dropped.append(flag)
        else:
            kept += extra[i:i + n]
        i += n
    return kept, dropped


def settings(name: str, cfg: dict) -> str:
    """A method's settings as ``k=v, ...`` from a config dict: the shared ones of SHOWN and the
    method's own options (the client-wise lr rule only when it is on)."""
    m, _ = resolve(name)
    unused = (METHOD_FIELDS - m.options) | set(m.ignores)
    own = set(m.options)
    out = []
    for f in dataclasses.fields(FedConfig):
        k = f.name
        if k not in cfg or not (k in SHOWN or k in own) or (k in unused and k not in m.fixed):
            continue
        if k in ("lr_rule", "lr_signal", "lr_delta") and not cfg.get("clientwise_lr"):
            continue
        if cfg[k] is None and k in ("model", "data", "eval_category"):
            continue
        out.append(f"{k}={cfg[k]}")
    return ", ".join(out)


def default_config(name: str) -> dict:
    """kseed-fed --method NAME's configuration with no other option (before the data is read)."""
    m, sets = resolve(name)
    return dataclasses.asdict(dataclasses.replace(FedConfig(), **m.configure(sets)))


# ---------------------------------------------------------------------------------- running
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


# ---------------------------------------------------------------------------------- reading
def mean_sd(xs) -> Tuple[Optional[float], Optional[float]]:
    """(mean, sd with n - 1) of the finite values of ``xs`` (None for missing); (None, None) if none."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def curve(rows: List[dict]) -> List[dict]:
    """Per round r (0, 1, ...): the held-out loss (None where not evaluated), the cumulative bytes
    one sampled client moved (down + up, per client per round, summed over rounds 1..r) and the
    cumulative seconds of rounds 1..r."""
    out, b, s = [], 0.0, 0.0
    for r in sorted(rows, key=lambda r: r.get("round", 0)):
        if r.get("round", 0) >= 1:
            n_down = len(r.get("bytes_down_per_client") or {})
            n_up = len(r.get("bytes_up_per_client") or {})
            b += (r.get("bytes_down") or 0) / max(1, n_down) + (r.get("bytes_up") or 0) / max(1, n_up)
            s += r.get("seconds") or 0.0
        out.append({"round": r.get("round", 0), "loss": r.get("eval_loss"), "bytes": b, "seconds": s})
    return out


def read_run(d: str) -> Optional[dict]:
    """The numbers of one finished run (None if it has not finished)."""
    if state(d) != "done":
        return None
    from kseed.rundir import read_metrics
    with open(os.path.join(d, "summary.json"), encoding="utf-8") as f:
        s = json.load(f)
    rows = read_metrics(d)
    rounds = [r for r in rows if r.get("round", 0) >= 1]
    sent = sum(len(r.get("bytes_down_per_client") or {}) for r in rounds)
    got = sum(len(r.get("bytes_up_per_client") or {}) for r in rounds)
    n = max(1, s.get("rounds") or len(rounds))
    rb = s.get("rebuild_seconds_this_process")
    rss, cuda = s.get("peak_rss_bytes_this_process"), s.get("peak_cuda_bytes_this_process")
    return {
        "loss": s.get("eval_loss_last"), "loss_first": s.get("eval_loss_first"),
        "diverged": bool(s.get("diverged")), "rouge_l": s.get("rouge_l"),
        "down_per_client_round": sum(r.get("bytes_down") or 0 for r in rounds) / max(1, sent),
        "up_per_client_round": sum(r.get("bytes_up") or 0 for r in rounds) / max(1, got),
        "down_total": s.get("bytes_down_total"), "up_total": s.get("bytes_up_total"),
        "rebuild_s_per_round": None if rb is None else rb / n,
        "s_per_round": (sum(r.get("seconds") or 0 for r in rounds) / len(rounds)) if rounds else None,
        "peak_rss_mib": None if rss is None else rss / 2 ** 20,
        "peak_cuda_mib": None if cuda is None else cuda / 2 ** 20,
        "rounds": s.get("rounds"), "config": _config(d), "curve": curve(rows),
    }


def _config(d: str) -> dict:
    try:
        with open(os.path.join(d, "checkpoint.json"), encoding="utf-8") as f:
            return json.load(f)["server"]["config"]
    except (OSError, KeyError, ValueError):
        return {}


def mean_curve(runs: List[dict]) -> List[dict]:
    """Over the runs of one method, per round that every run evaluated: the mean loss, its lowest
    and highest, and the mean cumulative bytes and seconds."""
    by_round: Dict[int, List[dict]] = {}
    for r in runs:
        for p in r["curve"]:
            if p["loss"] is not None and math.isfinite(p["loss"]):
                by_round.setdefault(p["round"], []).append(p)
    out = []
    for rnd in sorted(by_round):
        ps = by_round[rnd]
        if len(ps) != len(runs):
            continue
        losses = [p["loss"] for p in ps]
        out.append({"round": rnd, "loss": sum(losses) / len(ps), "lo": min(losses),
                    "hi": max(losses), "bytes": sum(p["bytes"] for p in ps) / len(ps),
                    "seconds": sum(p["seconds"] for p in ps) / len(ps)})
    return out


# ---------------------------------------------------------------------------------- writing
COLUMNS = ("method", "runs", "final held-out loss (mean +- sd)", "first", "Rouge-L (mean +- sd)",
           "bytes down / client / round", "bytes up / client / round", "bytes down total",
           "bytes up total", "s / round", "rebuild s / round", "peak RSS MiB")


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table_row(name: str, runs: List[dict]) -> str:
    if not runs:
        return "| " + " | ".join([name, "0"] + ["-"] * (len(COLUMNS) - 2)) + " |"
    loss, loss_sd = mean_sd([r["loss"] for r in runs])
    rouge, rouge_sd = mean_sd([r["rouge_l"] for r in runs])
    col = {k: mean_sd([r[k] for r in runs])[0] for k in
           ("loss_first", "down_per_client_round", "up_per_client_round", "down_total", "up_total",
            "s_per_round", "rebuild_s_per_round", "peak_rss_mib", "peak_cuda_mib")}
    mem = _fmt(col["peak_rss_mib"], ".1f")
    if col["peak_cuda_mib"] is not None:
        mem += f" (CUDA {col['peak_cuda_mib']:.1f})"
    diverged = sum(r["diverged"] for r in runs)  # their final loss is not finite: left out
    cells = [name, f"{len(runs)}" + (f" ({diverged} diverged)" if diverged else ""),
             f"{_fmt(loss, '.4f')} +- {_fmt(loss_sd, '.4f')}", _fmt(col["loss_first"], ".4f"),
             f"{_fmt(rouge, '.4f')} +- {_fmt(rouge_sd, '.4f')}",
             _fmt(col["down_per_client_round"], ",.0f"), _fmt(col["up_per_client_round"], ",.0f"),
             _fmt(col["down_total"], ",.0f"), _fmt(col["up_total"], ",.0f"),
             _fmt(col["s_per_round"], ".2f"), _fmt(col["rebuild_s_per_round"], ".4f"), mem]
    return "| " + " | ".join(cells) + " |"


def render_plots(curves: Dict[str, List[dict]], runs: Dict[str, int]) -> Dict[str, bytes]:
    """{file name: PNG bytes} of the two plots from each method's mean_curve (``runs``: each
    method's number of runs, shown in the legend)."""
    from kseed.rundir import figure_png, pyplot
    plt = pyplot()
    colors = plt.get_cmap("tab10").colors
    out = {}
    for name, key, xlabel, log in (
            (PLOTS[0], "bytes", "cumulative bytes per sampled client (down + up, log scale)", True),
            (PLOTS[1], "seconds", "cumulative wall time of the rounds (s)", False)):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for i, (m, pts) in enumerate(curves.items()):
            pts = [p for p in pts if p[key] > 0] if log else pts
            if not pts:
                continue
            x = [p[key] for p in pts]
            c = colors[i % len(colors)]
            ax.plot(x, [p["loss"] for p in pts], marker=".", color=c, label=f"{m} ({runs[m]})")
            ax.fill_between(x, [p["lo"] for p in pts], [p["hi"] for p in pts], color=c, alpha=0.15,
                            linewidth=0)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_title("held-out loss against " + ("bytes" if log else "wall time")
                     + " (legend: method (runs))", fontsize=10)
        ax.set_ylabel("held-out loss (mean over seeds;\nband: lowest to highest seed)")
        ax.grid(alpha=0.3, which="both" if log else "major")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
        out[name] = figure_png(fig)
    return out


def report(out: str, methods: List[str], seeds: List[int]) -> str:
    """compare.md's text (also written to OUT/compare.md, with the plots beside it)."""
    from kseed.rundir import atomic_write
    lines = ["# Methods compared", "",
             f"Runs in `{os.path.abspath(out)}`: seeds {seeds[0]}..{seeds[-1]} ({len(seeds)}), written "
             f"by bench/compare_methods.py on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             "every number read from the runs' metrics.jsonl / summary.json (means over the seeds' "
             "runs; sd with n - 1).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    found, curves, shown = {}, {}, {}
    for m in methods:
        runs = [r for r in (read_run(run_dir(out, m, s)) for s in seeds) if r is not None]
        lines.append(table_row(m, runs))
        if runs:
            found[m] = runs
            kept = [r for r in runs if not r["diverged"]]  # the plots: the runs that did not diverge
            if kept:
                curves[m], shown[m] = mean_curve(kept), len(kept)
    lines += ["", "Columns: final held-out loss and Rouge-L are the final model's (summary.json); "
              "bytes per client per round are the messages' sizes averaged over the clients and "
              "rounds 1.. (metrics.jsonl); totals are all clients' over the run; s / round is the "
              "rounds' wall time (metrics.jsonl seconds: the clients' local work, aggregation and "
              "evaluation); peak RSS is the peak resident memory of the whole kseed-fed process "
              "(in-process simulation: the server, the evaluation and every client together, so an "
              "upper bound on one client's; '-': the run predates the measurement). The machine's "
              "load changes the seconds, not the losses or bytes.", "",
              f"![held-out loss against bytes]({PLOTS[0]})", "",
              f"![held-out loss against wall time]({PLOTS[1]})", "",
              "Plots: one line per method, the mean over its seeds at each evaluated round, with a band "
              "from the lowest to the highest seed; bytes are those one sampled client moves (down + "
              "up), cumulated from round 1 (log x axis); wall time is the rounds' cumulated seconds; "
              "the legend gives the runs drawn (a diverged run is left out).",
              "", "Settings (the first run's checkpoint; the seed varies):", ""]
    lines += [f"- {m}: {settings(m, runs[0]['config'])}" for m, runs in found.items()]
    lines += ["", "Tuning (how the defaults were chosen):", ""]
    for m, runs in found.items():
        cfg, dflt = runs[0]["config"], default_config(m)
        note = TUNING.get(m, "no tuning recorded (bench/compare_methods.py TUNING): kseed-fed's "
                             "defaults")
        if cfg.get("lr") != dflt.get("lr"):
            note = f"lr {cfg.get('lr')} set on the command line (default {dflt.get('lr')})"
        lines.append(f"- {m}: {note}")
    lines += ["", TUNING_NOTE]
    text = "\n".join(lines) + "\n"
    os.makedirs(out, exist_ok=True)
    try:
        for name, png in render_plots(curves, shown).items():
            atomic_write(os.path.join(out, name), png)
    except ImportError as exc:  # matplotlib missing: the table still stands
        print(f"compare_methods: no plots: {exc}", file=sys.stderr)
    atomic_write(os.path.join(out, "compare.md"), text)
    return text


def _epilog() -> str:
    lines = [__doc__, "Each method's settings at kseed-fed's defaults:", ""]
    lines += [f"  {m}: {settings(m, default_config(m))}" for m in all_methods()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=_epilog())
    ap.add_argument("--methods", default="all",
                    help=f"all, or a comma list of: {', '.join(all_methods())} (default: all)")
    ap.add_argument("--seeds", type=parse_seeds, default=parse_seeds(DEFAULT_SEEDS),
                    help=f"run seeds: N-M or a comma list (default: {DEFAULT_SEEDS})")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="runs at a time, one thread each (default: cores - 1)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "compare_methods"),
                    help="where the runs, compare.md and the plots go (default: runs/compare_methods)")
    ap.add_argument("--report-only", action="store_true",
                    help="write compare.md and the plots from the runs in --out; run nothing")
    a = ap.parse_args(argv)
    try:
        names = parse_methods(a.methods)
    except ValueError as exc:
        ap.error(str(exc))
    if a.jobs < 1:
        ap.error("--jobs must be >= 1")
    own = [t for t in extra if t.split("=", 1)[0] in OWN_OPTIONS]
    if own:
        ap.error(f"{own[0]} after --: compare_methods sets {', '.join(OWN_OPTIONS)} itself")
    if not a.report_only:
        todo = [(m, s) for m in names for s in a.seeds]
        args = {}
        for m in names:
            args[m], dropped = method_args(m, extra)
            if dropped:
                print(f"compare_methods: --method {m} does not take {', '.join(dropped)}: its runs "
                      "go without", file=sys.stderr)
        skipped = sum(state(run_dir(a.out, m, s)) == "done" for m, s in todo)
        print(f"compare_methods: {len(todo)} runs ({skipped} finished before), {a.jobs} at a time",
              file=sys.stderr)
        failed: Dict[str, str] = {}
        with ThreadPoolExecutor(a.jobs) as pool:
            for r in pool.map(lambda ms: launch(ms[0], ms[1], run_dir(a.out, *ms), args[ms[0]]),
                              todo):
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
