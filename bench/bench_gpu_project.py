"""project_seeds throughput on the GPU (issue 19): element-seeds per second vs K for the cuda and triton
backends, each against the fused apply (apply_seeds_multi_) of the same seeds on the same tensors, both
noise families; the ratio project / apply (the CPU target is >= 0.8 at K = 256).

    python bench/bench_gpu_project.py               # H100 / H200: a minute or two
    python bench/bench_gpu_project.py --smoke       # CPU syntax check: tiny shapes, the cpu backend

Workload: a prefix of bench_gpu_apply.py's LLaMA-shaped 1.1B parameter list (layer tensors first) holding
about --work element-seeds, float32 (--dtypes); one project_seeds_multi call against one
apply_seeds_multi_ call.  Times are medians of --reps calls after a warm-up (CUDA events), the two ops
timed one after the other for each K.
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import kseed_kernels as kk  # noqa: E402
from _llama_shapes import numel_of  # noqa: E402
from bench_gpu_apply import DT, common_args, prefix_for, timed, workload  # noqa: E402


def main():
    args = common_args(__doc__, "fp32").parse_args()
    device, shapes, ks, work, reps, backends = workload(
        args, "1,16", ("cpu",), "1,16,256,1024", 1e11, ("cuda", "triton"))
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
          f"backends: {backends}", flush=True)
    rows = []
    g = torch.Generator().manual_seed(0)
    for dname in args.dtypes.split(","):
        for K in ks:
            sub = prefix_for(shapes, int(work / K))
            n = numel_of(sub)
            params = [torch.empty(s, dtype=DT[dname], device=device).normal_(0, 0.02) for _, s in sub]
            streams = [kk.stream_id(name) for name, _ in sub]
            seeds = torch.randint(0, 2**62, (K,), generator=g, dtype=torch.int64)
            coefs = (torch.randn(K, generator=g) * 1e-6).float()
            for b in backends:
                for nz in args.noises.split(","):
                    ta = timed(lambda: kk.apply_seeds_multi_(params, streams, seeds, coefs, backend=b,
                                                             noise=nz), reps, device)
                    tp = timed(lambda: kk.project_seeds_multi(params, streams, seeds, backend=b,
                                                              noise=nz), reps, device)
                    rows.append((dname, K, b, nz, n, ta, tp))
                    print(f"  {dname} K={K} {b} {nz}: apply {ta * 1e3:.2f} ms, project {tp * 1e3:.2f} ms",
                          flush=True)
            del params
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print()
    print(f"{'dtype':5} {'K':>5} {'backend':8} {'noise':10} {'elements':>13} {'apply Ge-s/s':>12} "
          f"{'project Ge-s/s':>14} {'project/apply':>13}")
    for dname, K, b, nz, n, ta, tp in rows:
        print(f"{dname:5} {K:>5} {b:8} {nz:10} {n:>13,} {n * K / ta / 1e9:>12.2f} {n * K / tp / 1e9:>14.2f} "
              f"{ta / tp:>13.2f}")


if __name__ == "__main__":
    main()
