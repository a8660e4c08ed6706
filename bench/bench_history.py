"""Rebuilding a global model from a seed history (issue #23): a client with no model rebuilds w0 + the
history, one fused apply per round; a client that kept its model catches up on one missed round.

    python bench/bench_history.py                 # the 0.60B model of bench/bench_memory.py, 2 threads
    python bench/bench_history.py --smoke         # a tiny model: the plumbing, plus a bitwise check
    python bench/bench_history.py --noises rademacher --pairs 2000 --rounds 40   # the full history

The model is bench_memory.py's (built once into --cache, default ~/.cache/kseed-bench, by its own
builder; nothing is downloaded), loaded by kseed.modeling.load_model in fp32, with w0 mapped from its
file (kseed.weights.host_w0), as a client holds it.  The history is --rounds rounds of --pairs fresh
(seed, coefficient) pairs each, in a SeedHistory file; the paper's Dolly setting is 40 rounds of
2,000 pairs (10 clients x tau = 200), 80,000 pairs.

For each noise family, in one process with --threads threads:
  rebuild   apply_history(ms, history.read(1, R), bases=w0): the first round out of place from w0,
            then one in-place apply per round
  catch-up  one more round of --pairs pairs applied to the rebuilt model (a client that missed it)
  cache     ModelCache.save and .load of the rebuilt model (SHA-256 of the file on both sides)
Reported: seconds, the process's CPU seconds (on a shared machine, wall / CPU shows the share it got)
and G element-seed/s (parameters x pairs / seconds), and extrapolated (clearly
labelled: linear in the pairs at the measured rate) to --total-pairs pairs and to a 2,000-pair round.
On a 2-core CPU the full 80,000-pair rebuild takes about 18 min with Rademacher noise and hours with
Gaussian noise, so the defaults measure less: Rademacher 2 rounds of 2,000 pairs, Gaussian 1 round of
200 pairs (--pairs / --rounds set both families).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, os.path.join(ROOT, "python"), ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_memory as BM  # noqa: E402  (the model's builder and location)

DEFAULTS = {"rademacher": (2000, 2), "gaussian": (200, 1)}  # (pairs per round, rounds)
SMOKE_DEFAULTS = {"rademacher": (64, 3), "gaussian": (32, 3)}
DOLLY_ROUND = 2000


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def run_noise(model, w0, where, noise, pairs, rounds, total_pairs, tmp, smoke, seed):
    import numpy as np
    import torch

    from kseed.history import ModelCache, SeedHistory, apply_history
    from kseed.weights import bitwise_equal
    from kseed_kernels import ModelSeeds

    ms = ModelSeeds(model, noise=noise)
    rng = np.random.default_rng(seed)
    hist = SeedHistory(os.path.join(tmp, f"history-{noise}.bin"))
    for r in range(1, rounds + 2):  # the last one is the round the catching-up client missed
        hist.append(r, rng.integers(0, 2**64 - 1, pairs, dtype=np.uint64, endpoint=True),
                    (rng.standard_normal(pairs) * 1e-4).astype(np.float32))
    n = ms.numel
    t, c = time.perf_counter(), time.process_time()
    done = apply_history(ms, hist.read(1, rounds), bases=w0)
    rebuild_s, rebuild_cpu = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    apply_history(ms, hist.read(rounds + 1, rounds + 1))
    catch_s, catch_cpu = time.perf_counter() - t, time.process_time() - c
    cache = ModelCache(os.path.join(tmp, f"cache-{noise}"))
    ident = {"bench": "bench_history", "noise": noise}
    t = time.perf_counter()
    cache.save(ms, rounds + 1, hist.digest(), ident)
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    loaded = cache.load(ms, identity=ident)
    load_s = time.perf_counter() - t
    assert loaded == (rounds + 1, hist.digest()), loaded
    res = {"noise": noise, "parameters": n, "w0": where, "pairs_per_round": pairs, "rounds": rounds,
           "rebuild_pairs": done, "rebuild_s": rebuild_s, "rebuild_rate": n * done / rebuild_s,
           "rebuild_cpu_s": rebuild_cpu, "catch_up_pairs": pairs, "catch_up_s": catch_s,
           "catch_up_rate": n * pairs / catch_s, "catch_up_cpu_s": catch_cpu,
           "cache_save_s": save_s, "cache_load_s": load_s, "history_bytes": os.path.getsize(hist.path)}
    res["extrapolated_rebuild_s"] = n * total_pairs / res["rebuild_rate"]
    res["extrapolated_round_s"] = n * DOLLY_ROUND / res["catch_up_rate"]
    if smoke:  # the catch-up equals a rebuild through the same rounds, bitwise
        check = [torch.empty_like(p) for p in ms.params]
        ref = ModelSeeds(list(zip(ms.names, check)), noise=noise)
        apply_history(ref, hist.read(1, rounds + 1), bases=w0)
        res["catch_up_bitwise_equal_rebuild"] = all(bitwise_equal(a, b)
                                                    for a, b in zip(ms.params, ref.params))
        assert res["catch_up_bitwise_equal_rebuild"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "kseed-bench"))
    ap.add_argument("--noises", default="rademacher,gaussian")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per round (both families)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds rebuilt (both families)")
    ap.add_argument("--total-pairs", type=int, default=80_000, help="the history extrapolated to")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--smoke", action="store_true", help="a tiny model: checks the plumbing only")
    a = ap.parse_args(argv)
    noises = [x for x in a.noises.split(",") if x]
    bad = [x for x in noises if x not in DEFAULTS]
    if bad:
        ap.error(f"unknown noise(s) {bad}; choose from {sorted(DEFAULTS)}")
    for name in ("pairs", "rounds"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1")

    import torch

    from kseed import modeling as M
    from kseed.weights import host_w0
    from kseed_kernels import ModelSeeds

    torch.set_num_threads(a.threads)
    cache = os.path.abspath(a.cache + ("-smoke" if a.smoke else ""))
    BM.build(cache, a.smoke)
    kcache = os.path.join(cache, "kseed-cache")
    os.environ["KSEED_CACHE"] = kcache  # w0 maps the model file; anything else goes here
    source = BM.model_dir(cache)
    t = time.perf_counter()
    model, _ = M.load_model(source, "fp32")
    load_s = time.perf_counter() - t
    w0, where = host_w0(model, ModelSeeds(model), source=source)  # before any round changes the model
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-history-", dir=cache) as tmp:
        for i, noise in enumerate(noises):
            pairs, rounds = (SMOKE_DEFAULTS if a.smoke else DEFAULTS)[noise]
            pairs, rounds = a.pairs or pairs, a.rounds or rounds
            results.append(run_noise(model, w0, where, noise, pairs, rounds, a.total_pairs, tmp,
                                     a.smoke, seed=1000 + i))
    meta = {"commit": _commit(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "threads": a.threads, "torch": torch.__version__, "load_model_s": load_s,
            "load_avg": os.getloadavg()[0], "smoke": a.smoke, "total_pairs": a.total_pairs}
    n = results[0]["parameters"] if results else 0
    print(f"\nseed-history rebuild, {n:,} parameters (fp32), {a.threads} threads, commit "
          f"{meta['commit']}, load average {meta['load_avg']:.1f} at the end")
    print("| noise | what | pairs | seconds | G element-seed/s | process CPU s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        gr = r["rebuild_rate"] / 1e9
        gc = r["catch_up_rate"] / 1e9
        print(f"| {r['noise']} | rebuild from w0, measured ({r['rounds']} x {r['pairs_per_round']}) | "
              f"{r['rebuild_pairs']:,} | {r['rebuild_s']:.1f} | {gr:.2f} | {r['rebuild_cpu_s']:.1f} |")
        print(f"| {r['noise']} | catch-up on one missed round, measured | {r['catch_up_pairs']:,} | "
              f"{r['catch_up_s']:.1f} | {gc:.2f} | {r['catch_up_cpu_s']:.1f} |")
        print(f"| {r['noise']} | rebuild from w0, **extrapolated** | {a.total_pairs:,} | "
              f"{r['extrapolated_rebuild_s']:.0f} ({r['extrapolated_rebuild_s'] / 60:.1f} min) | "
              f"{gr:.2f} | - |")
        if r["catch_up_pairs"] != DOLLY_ROUND:
            print(f"| {r['noise']} | catch-up on one {DOLLY_ROUND:,}-pair round, **extrapolated** | "
                  f"{DOLLY_ROUND:,} | {r['extrapolated_round_s']:.1f} | {gc:.2f} | - |")
        print(f"| {r['noise']} | ModelCache save / load (SHA-256 both sides) | - | "
              f"{r['cache_save_s']:.1f} / {r['cache_load_s']:.1f} | - | - |")
    out = {"meta": meta, "results": results}
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
