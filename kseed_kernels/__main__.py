"""python -m kseed_kernels: a short demonstration of the ops on this machine."""
import time

import torch

import kseed_kernels as kk


def main():
    print("kseed_kernels", kk.__version__, "| backends:", ", ".join(kk.backends()))
    w0 = torch.randn(1 << 20)
    seeds = list(range(1000, 1032))
    coefs = [(-1) ** k * 1e-3 for k in range(32)]
    t0 = time.perf_counter()
    a = kk.apply_seeds_(w0.clone(), seeds, coefs, stream=kk.stream_id("demo.weight"))
    dt = time.perf_counter() - t0
    b = kk.apply_seeds_(w0.clone(), seeds, coefs, stream=kk.stream_id("demo.weight"), backend="reference")
    print(f"applied K=32 seeds to 2^20 weights in {dt * 1e3:.1f} ms "
          f"({32 * w0.numel() / dt / 1e9:.2f} G element-seed updates/s)")
    print("default backend == reference, bitwise:", torch.equal(a, b))
    print("first normals of seed 0:", kk.gaussian(0, 4).tolist())


if __name__ == "__main__":
    main()
