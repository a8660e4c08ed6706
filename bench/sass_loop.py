"""Static look at the compiled GPU kernels, no GPU needed: registers, shared memory, spills and the length
of each kernel's inner K loop in SASS instructions, with the instruction mix.

    python bench/sass_loop.py                  # compiles csrc/cuda/kseed_cuda_kernels.cu for sm_90
    python bench/sass_loop.py --arch 80
    python bench/sass_loop.py --cubin F.cubin  # any cubin, e.g. a Triton kernel from ~/.triton/cache

The fused apply kernels are arithmetic-bound, so SASS instructions per element-seed (the inner loop's
length over the elements one thread handles per seed) is the number a change to the kernels should move.
It is a count, not a timing: bench/bench_gpu_apply.py measures.  For the Rademacher variants the inner
loop is the per-seed sign-and-add loop; their Philox calls (one per seed per 128 elements, shared by the
CTA through shared memory) sit outside it, once per batch of 16 seeds.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ELEMS_PER_THREAD_SEED = 8  # csrc/cuda/kseed_cuda.cuh: kBlocksPerThread (2) Philox blocks of 4 elements


def _tool(name):
    cands = [shutil.which(name), f"/usr/local/cuda/bin/{name}"]
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except ImportError:
        pass
    for c in cands:
        if c and os.path.exists(c):
            return c
    sys.exit(f"sass_loop: {name} not found (CUDA toolkit or triton's bundled tools)")


def build_cuda_cubin(arch: int, out_dir: str) -> str:
    cubin = os.path.join(out_dir, f"kseed_cuda_sm{arch}.cubin")
    cmd = [_tool("nvcc"), "-O3", "-std=c++17", "--fmad=false", "-DKSEED_WITH_CUDA", f"-arch=sm_{arch}",
           "-cubin", "-I", os.path.join(ROOT, "csrc"), "-o", cubin,
           os.path.join(ROOT, "csrc", "cuda", "kseed_cuda_kernels.cu")]
    subprocess.run(cmd, check=True)
    return cubin


NOISE_NAMES = ("gaussian", "rademacher")  # csrc/kseed_types.h: enum Noise


def _demangle_short(name: str) -> str:
    m = re.search(r"(apply_kernel|noise_floor_kernel|gaussian_kernel|rademacher_kernel)"
                  r"(?:ILNS0?_5DTypeE(\d)ELi(\d)ELb(\d)ELi(\d))?(?:ILi(\d)E)?", name)
    if not m:
        return name[:60]
    if m.group(6) is not None:  # noise_floor_kernel<NOISE>
        return f"{m.group(1)}<{NOISE_NAMES[int(m.group(6))]}>"
    if m.group(2) is None:
        return m.group(1)
    dt = ("f32", "bf16", "f16")[int(m.group(2))]
    rnd = ("nearest", "stochastic")[int(m.group(3))]
    al = "aligned" if m.group(4) == "1" else "unaligned"
    return f"{m.group(1)}<{dt},{rnd},{al},{NOISE_NAMES[int(m.group(5))]}>"


def analyse(cubin: str):
    sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], check=True, capture_output=True,
                          text=True).stdout
    res = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], check=True, capture_output=True,
                         text=True).stdout
    usage = dict(re.findall(r"Function (\S+):\s*\n\s*(REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+)", res))
    rows = []
    for chunk in re.split(r"\n\s*Function : ", sass)[1:]:
        name = chunk.split("\n", 1)[0].strip()
        ins = [(int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", chunk)]
        loops = []
        for a, t in ins:
            m = re.search(r"BRA\b.*?(0x[0-9a-f]+)", t)
            if m and int(m.group(1), 16) < a:
                loops.append((int(m.group(1), 16), a))
        # The inner K loop: the longest loop that contains no other loop.
        inner = [lp for lp in loops
                 if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops)]
        body = []
        if inner:
            lo, hi = max(inner, key=lambda lp: sum(lp[0] <= a <= lp[1] for a, _ in ins))
            body = [t for a, t in ins if lo <= a <= hi]
        mix = collections.Counter((t.split()[1] if t.startswith("@") else t.split()[0]).split(".")[0]
                                  for t in body)
        rows.append((_demangle_short(name), len(ins), len(body), usage.get(name, "?"), mix))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--cubin", nargs="*", default=None, help="analyse these cubins instead")
    ap.add_argument("--elems", type=int, default=ELEMS_PER_THREAD_SEED,
                    help="elements one thread handles per seed (8 for csrc/cuda; Triton's apply: 8)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cubins = args.cubin or [build_cuda_cubin(args.arch, tmp)]
        for cubin in cubins:
            print(f"# {os.path.basename(cubin)}")
            print("| kernel | SASS total | inner loop | per element-seed | resources | loop mix (top 8) |")
            print("|---|---|---|---|---|---|")
            for name, total, loop, use, mix in analyse(cubin):
                per = f"{loop / args.elems:.1f}" if loop else "-"
                top = ", ".join(f"{k} {v}" for k, v in mix.most_common(8))
                print(f"| {name} | {total} | {loop} | {per} | {use} | {top} |")


if __name__ == "__main__":
    main()
