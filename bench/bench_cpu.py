"""CPU benchmark of the compiled kernels (issue #6): apply_seeds_ on a 10M-parameter LLaMA-shaped model.

    python bench/bench_cpu.py [--threads 2] [--repeats 5] [--quick]

1. The ratio against the baseline that the issue names, measured in the same process, alternating,
   median of --repeats runs: per seed, torch.manual_seed(seed); for each parameter
   z = torch.normal(0, 1, size); p.add_(z, alpha=c).  Ours: one kseed_kernels.apply_seeds_multi_ call
   (backend="cpu") over all the parameters with the same K = 32 seeds.
2. Absolute rates (element-seed updates per second) for K = 1, 2, 32, 1024, float32 and bfloat16, for
   each SIMD path the CPU supports.
3. The Rademacher family (issue 12), once the ops take noise= (skipped, with a note, before): rates at
   K = 1, 2, 32, 256, 1024 (float32 and bfloat16, the automatic path), each alternating with the
   Gaussian fused apply on the same tensors, the ratio rademacher / gaussian (target >= 15x at K = 256
   and 1024, float32), and at K = 1 a plain add_ pass (p.add_(q) over every parameter, same dtype) timed
   in the same alternation, as the memory reference.
   bench/bench_cpu_tiles.cpp measures the same on the tile kernels without torch.
4. project_seeds (issue 19), the transpose of apply: on the whole 10.4M-element set, float32, K = 256,
   both noise families, one project_seeds_multi call alternating with the fused apply
   (apply_seeds_multi_) of the same seeds on the same tensors, medians; the ratio project rate / apply
   rate (target >= 0.8).  --project-only runs just this table.
The tables are printed last.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kseed_kernels as kk  # noqa: E402
from kseed_kernels.backends import cpu as CPU  # noqa: E402

from _baseline import perturb_seeds  # noqa: E402  (bench/, this script's folder)


def llama_shapes(vocab=8000, hidden=256, inter=688, layers=8):
    """The issue's 10M-parameter model: embed, 8 x (q, k, v, o, gate, up, down, 2 norms), norm, lm_head."""
    try:  # the shared shape helper gives transformers' parameter names (so real stream ids)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _llama_shapes import llama_shapes as shared

        return shared(hidden=hidden, intermediate=inter, layers=layers, heads=4, kv_heads=4, vocab=vocab)
    except ImportError:
        pass
    shapes = [("embed", (vocab, hidden))]
    for i in range(layers):
        for n in ("q", "k", "v", "o"):
            shapes.append((f"l{i}.{n}", (hidden, hidden)))
        shapes += [(f"l{i}.gate", (inter, hidden)), (f"l{i}.up", (inter, hidden)),
                   (f"l{i}.down", (hidden, inter)), (f"l{i}.norm1", (hidden,)),
                   (f"l{i}.norm2", (hidden,))]
    shapes += [("norm", (hidden,)), ("lm_head", (vocab, hidden))]
    return shapes


def make_params(dtype, shapes):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(s, generator=g) * 0.02).to(dtype) for _, s in shapes]


def ours(params, streams, seeds, coefs):
    kk.apply_seeds_multi_(params, streams, seeds, coefs, backend="cpu")


def has_noise():
    """Whether this build's ops take noise= (the op plumbing of issue 12)."""
    import inspect

    return hasattr(kk, "rademacher") and "noise" in inspect.signature(kk.apply_seeds_multi_).parameters


def noise_rows(big, streams, reps, quick):
    """(dtype, K, elements, gaussian rate, rademacher rate, add_ rate or None) rows.  At K = 1 a plain
    add_ pass (p.add_(q) over every parameter, the same dtype) is timed in the same loop, so all three
    meet the same cache and load: the first of each alternation follows another pass over the set."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        params = [p.to(dtype) for p in big]
        qs = [torch.full_like(p, 1e-4) for p in params]
        for k in (1, 2, 32, 256, 1024):
            if k >= 256 and quick:  # a slice keeps --quick short: embed rows 0..255 (65536 elements)
                ps, st = [params[0][:256]], streams[:1]
            else:  # the measure: the whole 10.4M-element set, also at K = 256 and 1024
                ps, st = params, streams
            n = sum(p.numel() for p in ps)
            sd, cf = list(range(7, 7 + k)), [1e-4] * k
            run = {nz: (lambda nz=nz: kk.apply_seeds_multi_(ps, st, sd, cf, backend="cpu", noise=nz))
                   for nz in ("gaussian", "rademacher")}
            if k == 1:
                run["add_"] = lambda: [p.add_(q) for p, q in zip(ps, qs)]
            for f in run.values():
                f()  # warm-up
            r = 1 if (k == 1024 and quick) else min(reps, 3) if k >= 256 else reps
            t = {name: [] for name in run}
            for _ in range(r):
                for name, f in run.items():
                    t[name].append(timed(f))
            rate = {name: n * (1 if name == "add_" else k) / statistics.median(v) for name, v in t.items()}
            rows.append((str(dtype).replace("torch.", ""), k, n, rate["gaussian"], rate["rademacher"],
                         rate.get("add_")))
    return rows


def project_rows(big, streams, reps, quick):
    """(noise, K, elements, apply rate, project rate) rows: float32, K = 256, the whole set (--quick: the
    embed rows 0..255), the two ops alternating on the same tensors, medians of min(reps, 3)."""
    rows = []
    k = 256
    ps, st = ([big[0][:256]], streams[:1]) if quick else (big, streams)
    n = sum(p.numel() for p in ps)
    sd, cf = list(range(7, 7 + k)), [1e-4] * k
    for nz in ("gaussian", "rademacher"):
        run = {"apply": lambda nz=nz: kk.apply_seeds_multi_(ps, st, sd, cf, backend="cpu", noise=nz),
               "project": lambda nz=nz: kk.project_seeds_multi(ps, st, sd, noise=nz, backend="cpu")}
        for f in run.values():
            f()  # warm-up
        t = {name: [] for name in run}
        for _ in range(min(reps, 3)):
            for name, f in run.items():
                t[name].append(timed(f))
        rows.append((nz, k, n, n * k / statistics.median(t["apply"]), n * k / statistics.median(t["project"])))
    return rows


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def load():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller K=1024 set")
    ap.add_argument("--ratio-only", action="store_true", help="only the comparison with the baseline")
    ap.add_argument("--project-only", action="store_true", help="only the project_seeds table (4.)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reps = 3 if args.quick else args.repeats

    shapes = llama_shapes()
    names = [n for n, _ in shapes]
    streams = [kk.stream_id(n) for n in names]
    numel = sum(torch.Size(s).numel() for _, s in shapes)
    k = 32
    seeds = list(range(1000, 1000 + k))
    coefs = [0.001 * ((-1) ** i) * (1 + i % 5) for i in range(k)]

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print(f"model: {len(shapes)} tensors, {numel / 1e6:.2f}M parameters; SIMD paths {CPU.supported_isas()}, "
          f"auto = {CPU.isa()}; load average at start {load():.2f}")

    if args.project_only:
        prows = project_rows(make_params(torch.float32, shapes), streams, reps, args.quick)
        print_project(prows, reps)
        return

    # --- 1. ratio against the baseline (fp32, K = 32), alternating runs
    p_base = make_params(torch.float32, shapes)
    p_ours = make_params(torch.float32, shapes)
    ours(p_ours, streams, seeds[:1], coefs[:1])  # warm-up (loads, page faults)
    perturb_seeds(p_base, seeds[:1], coefs[:1])
    tb, to = [], []
    for _ in range(reps):
        tb.append(timed(lambda: perturb_seeds(p_base, seeds, coefs)))
        to.append(timed(lambda: ours(p_ours, streams, seeds, coefs)))
    mb, mo = statistics.median(tb), statistics.median(to)
    ratio = mb / mo

    # --- 2. absolute rates
    rows = []
    big = make_params(torch.float32, shapes)
    for isa in ([] if args.ratio_only else CPU.supported_isas()):
        CPU.set_isa(isa)
        for dtype in (torch.float32, torch.bfloat16):
            params = [p.to(dtype) for p in big]
            for kk_ in (1, 2, 32, 1024):
                if kk_ == 1024 or (isa == "scalar" and kk_ == 32):
                    # a slice of the model keeps the run short: embed rows 0..1023 (262144 elements)
                    ps = [params[0][: (256 if args.quick else 1024)]]
                    st = streams[:1]
                else:
                    ps, st = params, streams
                n = sum(p.numel() for p in ps)
                sd = list(range(7, 7 + kk_))
                cf = [1e-4] * kk_
                ours(ps, st, sd[:1], cf[:1])
                r = 1 if kk_ == 1024 else reps
                ts = [timed(lambda: ours(ps, st, sd, cf)) for _ in range(r)]
                t = statistics.median(ts)
                rows.append((isa, str(dtype).replace("torch.", ""), kk_, n, t, n * kk_ / t))
    CPU.set_isa(None)

    # --- 3. the Rademacher family against the Gaussian, same tensors, alternating
    nrows = []
    if not args.ratio_only and has_noise():
        nrows = noise_rows(big, streams, reps, args.quick)
    # --- 4. project_seeds against the fused apply, same tensors, alternating
    prows = [] if args.ratio_only else project_rows(big, streams, reps, args.quick)

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = "?"
    print()
    print(f"commit {commit}, load average at end {load():.2f}")
    print(f"baseline (torch.manual_seed + torch.normal + add_, fp32, K={k}): median {mb * 1e3:.1f} ms "
          f"of {reps} ({', '.join(f'{x * 1e3:.0f}' for x in tb)})")
    print(f"kseed apply_seeds_multi_ (cpu, {CPU.isa()}, fp32, K={k}):        median {mo * 1e3:.1f} ms "
          f"of {reps} ({', '.join(f'{x * 1e3:.0f}' for x in to)})")
    print(f"speed-up over baseline: {ratio:.2f}x   "
          f"(baseline {numel * k / mb / 1e6:.0f} M, kseed {numel * k / mo / 1e6:.0f} M element-seed updates/s)")
    if not rows:
        return
    print_project(prows, reps)
    print()
    print(f"{'path':8} {'dtype':9} {'K':>5} {'elements':>10} {'median s':>9} {'M elem-seed/s':>14}")
    for isa, dt, kk_, n, t, rate in rows:
        print(f"{isa:8} {dt:9} {kk_:5d} {n:10d} {t:9.4f} {rate / 1e6:14.1f}")
    print()
    if not nrows:
        print("rademacher rows: skipped (this build's ops take no noise= keyword yet; "
              "bench/bench_cpu_tiles.cpp measures the tile kernels)")
        return
    print(f"rademacher vs gaussian fused apply (cpu, {CPU.isa()}, medians of {reps}, alternating; at K = 1 "
          f"with a plain add_ pass over the same parameters, same dtype, in the same loop)")
    print(f"{'dtype':9} {'K':>5} {'elements':>10} {'gauss M e-s/s':>14} {'rad M e-s/s':>12} {'rad/gauss':>9} "
          f"{'add_ M el/s':>11} {'rad/add_':>8}")
    for dt, kk_, n, g, r, a in nrows:
        vs_add = f"{a / 1e6:11.1f} {r / a:8.2f}" if a else ""
        print(f"{dt:9} {kk_:5d} {n:10d} {g / 1e6:14.1f} {r / 1e6:12.1f} {r / g:9.2f} {vs_add}")


def print_project(prows, reps):
    print(f"project_seeds_multi vs the fused apply_seeds_multi_ (cpu, {CPU.isa()}, float32, medians of "
          f"{min(reps, 3)}, alternating; load average now {load():.2f})")
    print(f"{'noise':10} {'K':>5} {'elements':>10} {'apply M e-s/s':>14} {'project M e-s/s':>16} "
          f"{'project/apply':>13}")
    for nz, k, n, a, p in prows:
        print(f"{nz:10} {k:5d} {n:10d} {a / 1e6:14.1f} {p / 1e6:16.1f} {p / a:13.2f}")
    print()


if __name__ == "__main__":
    main()
