"""Rebuilding the global model from K accumulated (seed, coefficient) pairs on the GPU: time and peak
CUDA memory beyond the model, kseed (one apply_seeds_multi_ call) against the per-seed loop.

    python bench/bench_gpu_rebuild.py               # H100 / H200: LLaMA-shaped 1.1B, bf16, K = 4096
    python bench/bench_gpu_rebuild.py --smoke       # CPU syntax check: tiny shapes, K = 64

Memory: torch.cuda.max_memory_allocated() after the call minus memory_allocated() before it (the model
itself excluded).  The baseline (torch.manual_seed(seed); for p: z = torch.normal(...); p.add_(z, c)) is
timed over --baseline-seeds seeds and extrapolated per seed to K; its extra memory is one z of the
largest tensor.  Each noise family of --noises gets its rows (Rademacher: "<backend> rad") and, for triton
and cuda, its floor (the generate-and-sum work over the model's element count, no tensor traffic).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import kseed_kernels as kk  # noqa: E402
from _llama_shapes import LLAMA_TINY, llama_shapes, numel_of  # noqa: E402

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device):
    """(seconds, extra bytes at peak) of one call of fn()."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        m0 = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    t = time.perf_counter() - t0
    extra = torch.cuda.max_memory_allocated(device) - m0 if device.type == "cuda" else None
    return t, extra


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--dtype", default="bf16", choices=sorted(DT))
    ap.add_argument("--backends", default=None)
    ap.add_argument("--rounding", default="nearest", choices=("nearest", "stochastic"))
    ap.add_argument("--baseline-seeds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--noises", default="gaussian,rademacher",
                    help="comma-separated noise families; Rademacher rows are '<backend> rad', each "
                         "family with its floor '<backend> [rad ]floor' (triton, cuda)")
    args = ap.parse_args()
    if args.smoke:
        device = torch.device("cpu")
        shapes = llama_shapes(**LLAMA_TINY)
        K = args.k or 64
        default_backends = [b for b in ("cpu", "triton") if b in kk.backends()]
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU: run with --smoke for a CPU syntax check")
        device = torch.device("cuda")
        shapes = llama_shapes()
        K = args.k or 4096
        default_backends = [b for b in ("triton", "cuda") if b in kk.backends()]
    backends = args.backends.split(",") if args.backends else default_backends
    noises = args.noises.split(",")
    for nz in noises:
        if nz not in kk.ops.NOISES:
            sys.exit(f"--noises: unknown family {nz!r}; choose from {', '.join(kk.ops.NOISES)}")
    dtype = DT[args.dtype]
    n = numel_of(shapes)
    params = [torch.empty(s, dtype=dtype, device=device).normal_(0, 0.02) for _, s in shapes]
    streams = [kk.stream_id(name) for name, _ in shapes]
    g = torch.Generator().manual_seed(1)
    seeds = torch.randint(0, 2**62, (K,), generator=g, dtype=torch.int64)
    coefs = (torch.randn(K, generator=g) * 1e-5).float()
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
          f"{len(shapes)} tensors, {n:,} elements, {args.dtype}; K = {K}; backends {backends}",
          flush=True)

    def best_of(fn, warm: bool):
        if warm:
            fn()  # the first call compiles (JIT) and warms the allocator: not timed
        best = None
        for _ in range(args.reps):
            t, extra = measure(fn, device)
            best = (t, extra) if best is None or t < best[0] else best
        return best

    rows = []
    for b in backends:
        mod = importlib.import_module(f"kseed_kernels.backends.{b}")
        for nz in noises:
            meth = b if nz == "gaussian" else f"{b} rad"
            # warm-up (JIT compilation, allocator) on K = 1
            kk.apply_seeds_multi_(params, streams, seeds[:1], coefs[:1], backend=b,
                                  rounding=args.rounding, noise=nz)
            best = best_of(lambda: kk.apply_seeds_multi_(params, streams, seeds, coefs, backend=b,
                                                         rounding=args.rounding, noise=nz),
                           warm=False)
            rows.append((meth, best[0], best[1]))
            print(f"  {meth}: {best[0]:.3f} s", flush=True)
            if b in ("triton", "cuda") and hasattr(mod, "noise_floor"):
                # the generate-and-sum work over the model's element count, no tensor traffic
                best = best_of(lambda: mod.noise_floor(n, seeds, coefs, 7, device, noise=nz), warm=True)
                rows.append((meth + " floor", best[0], best[1]))
                print(f"  {meth} floor: {best[0]:.3f} s", flush=True)

    nb = min(K, args.baseline_seeds)

    def baseline():
        for s, c in zip(seeds[:nb].tolist(), coefs[:nb].tolist()):
            torch.manual_seed(s)
            for p in params:
                z = torch.normal(0.0, 1.0, p.shape, dtype=dtype, device=device)
                p.add_(z, alpha=c)

    baseline()  # warm-up
    t, extra = measure(baseline, device)
    rows.append((f"baseline (x{K}/{nb} extrap.)" if nb < K else "baseline", t / nb * K, extra))

    base_t = rows[-1][1]
    print()
    print(f"{'method':30} {'time s':>10} {'x baseline':>10} {'extra peak MB':>14} {'Gupd/s':>9}")
    for meth, t, extra in rows:
        mb = f"{extra / 2**20:.2f}" if extra is not None else "-"
        print(f"{meth:30} {t:>10.3f} {base_t / t:>10.2f} {mb:>14} {n * K / t / 1e9:>9.2f}")
    print(f"model: {n:,} elements ({n * params[0].element_size() / 2**30:.2f} GiB), K = {K}. Time: "
          f"best of {args.reps} calls (kseed); extra peak = max_memory_allocated - memory before.")


if __name__ == "__main__":
    main()
