"""apply_seeds_ throughput on the GPU: element-seed updates per second vs K, triton and cuda against
the per-seed loop of MeZO / FedKSeed and against the "floor" (a kernel that only generates and sums the
noise, reading and writing no tensor), for each noise family (--noises): the Gaussian rows are named
after the backend, the Rademacher rows "<backend> rad", each with its own floor ("<backend> rad floor").
The baseline is the Gaussian per-seed loop for both families.

    python bench/bench_gpu_apply.py                 # H100 / H200: a few minutes
    python bench/bench_gpu_apply.py --smoke         # CPU syntax check: tiny shapes, cpu/reference/triton

Workload: the parameters of a LLaMA-shaped 1.1B model (bench/_llama_shapes.py) in float32 or bfloat16,
updated with one apply_seeds_multi_ call (one launch per dtype).  At large K a call over the whole model
takes seconds, so each K uses a prefix of the parameter list (layer tensors first) holding about
--work element-seed updates; the throughput is per element-seed and does not depend on the prefix once
the GPU is full.  The baseline is the per-seed loop
    torch.manual_seed(seed); for p in params: z = torch.normal(0, 1, p.shape, dtype, device); p.add_(z, alpha=c)
timed over --baseline-seeds seeds and extrapolated per seed to K (the table says so).
Times are medians of --reps calls after a warm-up call (CUDA events on the GPU).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import kseed_kernels as kk  # noqa: E402
from _baseline import perturb_seeds  # noqa: E402
from _llama_shapes import LLAMA_TINY, llama_shapes, numel_of  # noqa: E402

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn, reps: int, device) -> float:
    """Median seconds of fn() over reps calls, after one warm-up call."""
    fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


def layer_first(shapes):
    """Layer tensors first (representative of the bulk), then embeddings, final norm and lm_head."""
    return [s for s in shapes if ".layers." in s[0]] + [s for s in shapes if ".layers." not in s[0]]


def prefix_for(shapes, budget_elems: int):
    out, n = [], 0
    for name, shape in shapes:
        if out and n >= budget_elems:
            break
        out.append((name, shape))
        m = 1
        for d in shape:
            m *= d
        n += m
    return out


def floor_fn(backend: str):
    if backend == "triton":
        from kseed_kernels.backends import triton as m
    elif backend == "cuda":
        from kseed_kernels.backends import cuda as m
    else:
        return None
    return m.noise_floor if hasattr(m, "noise_floor") else None


def common_args(doc: str, dtypes: str) -> argparse.ArgumentParser:
    """The options every GPU throughput bench takes (this one and bench_gpu_project.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (syntax check)")
    ap.add_argument("--ks", default=None, help="comma-separated K values")
    ap.add_argument("--dtypes", default=dtypes)
    ap.add_argument("--backends", default=None, help="comma-separated (default: all usable)")
    ap.add_argument("--work", type=float, default=None, help="element-seed updates per timed call")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--noises", default="gaussian,rademacher",
                    help="comma-separated noise families (gaussian, rademacher)")
    return ap


def workload(args, smoke_ks: str, smoke_backends, gpu_ks: str, gpu_work: float, gpu_backends):
    """(device, shapes, ks, work, reps, backends) of a run: --smoke tiny shapes on the CPU, else the 1.1B
    shapes on the GPU (exits without one); the options override the defaults."""
    if args.smoke:
        device, shapes = torch.device("cpu"), layer_first(llama_shapes(**LLAMA_TINY))
        ks, work, reps, usable = smoke_ks, args.work or 1e5, args.reps or 1, smoke_backends
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: run with --smoke for a CPU syntax check")
        device, shapes = torch.device("cuda"), layer_first(llama_shapes())
        ks, work, reps, usable = gpu_ks, args.work or gpu_work, args.reps or 3, gpu_backends
    default_backends = [b for b in usable if b in kk.backends()]
    backends = args.backends.split(",") if args.backends else default_backends
    return device, shapes, [int(k) for k in (args.ks or ks).split(",")], work, reps, backends


def main():
    ap = common_args(__doc__, "fp32,bf16")
    ap.add_argument("--baseline-seeds", type=int, default=3)
    args = ap.parse_args()
    device, shapes, ks, work, reps, backends = workload(
        args, "1,2,16", ("cpu", "triton", "reference"), "1,2,16,256,1024,4096", 2e11, ("triton", "cuda"))
    noises = args.noises.split(",")
    for nz in noises:
        if nz not in kk.ops.NOISES:
            sys.exit(f"--noises: unknown family {nz!r}; choose from {', '.join(kk.ops.NOISES)}")
    total = numel_of(shapes)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
          f"model: {len(shapes)} tensors, {total:,} elements; backends: {backends}", flush=True)

    rows = []
    g = torch.Generator().manual_seed(0)
    for dname in args.dtypes.split(","):
        dtype = DT[dname]
        for K in ks:
            sub = prefix_for(shapes, int(work / K))
            n = numel_of(sub)
            params = [torch.empty(s, dtype=dtype, device=device).normal_(0, 0.02) for _, s in sub]
            streams = [kk.stream_id(name) for name, _ in sub]
            seeds = torch.randint(0, 2**62, (K,), generator=g, dtype=torch.int64)
            coefs = (torch.randn(K, generator=g) * 1e-6).float()

            # baseline: per-seed loop, a few seeds, extrapolated per seed
            nb = min(K, args.baseline_seeds)
            bl = timed(lambda: perturb_seeds(params, seeds[:nb].tolist(), coefs[:nb].tolist()), reps,
                       device)
            t_base = bl / nb * K
            rows.append((dname, K, "baseline" + (" (extrap.)" if nb < K else ""), n, t_base))
            print(f"  {dname} K={K} n={n:,}: baseline {t_base * 1e3:.2f} ms", flush=True)

            for b in backends:
                for nz in noises:
                    meth = b if nz == "gaussian" else f"{b} rad"
                    t = timed(lambda: kk.apply_seeds_multi_(params, streams, seeds, coefs, backend=b,
                                                            noise=nz), reps, device)
                    rows.append((dname, K, meth, n, t))
                    print(f"  {dname} K={K}: {meth} {t * 1e3:.2f} ms", flush=True)
                    ff = floor_fn(b)
                    if ff is not None and dname == args.dtypes.split(",")[0]:
                        tf = timed(lambda: ff(n, seeds, coefs, 7, device, noise=nz), reps, device)
                        rows.append(("-", K, meth + " floor", n, tf))
                        print(f"  K={K}: {meth} floor {tf * 1e3:.2f} ms", flush=True)
            del params
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------ table (last)
    base = {(r[0], r[1]): r[4] for r in rows if r[2].startswith("baseline")}
    floor = {(r[1], r[2][:-6]): r[4] / r[3] for r in rows if r[2].endswith(" floor")}
    print()
    print(f"{'dtype':5} {'K':>5} {'method':22} {'elements':>13} {'time ms':>11} {'Gupd/s':>9} "
          f"{'x baseline':>10} {'% of floor':>10}")
    for dname, K, meth, n, t in rows:
        ups = n * K / t / 1e9
        sp = f"{base[(dname, K)] / t:.2f}" if (dname, K) in base else "-"
        fl = floor.get((K, meth))
        pf = f"{100 * fl / (t / n):.0f}%" if fl is not None and not meth.endswith("floor") else "-"
        print(f"{dname:5} {K:>5} {meth:22} {n:>13,} {t * 1e3:>11.3f} {ups:>9.2f} {sp:>10} {pf:>10}")
    print("Gupd/s: 1e9 element-seed updates per second (elements x K / time). Baseline at K > "
          f"{args.baseline_seeds}: timed over {args.baseline_seeds} seeds, extrapolated per seed.")


if __name__ == "__main__":
    main()
