"""Static instruction count of the CPU kernels' inner accumulate loop, per element-seed, for each path.

    python bench/cpu_insn_count.py [--cxx g++] [--aarch64-cxx aarch64-linux-gnu-g++] [--show PATH]

Compiles each ISA translation unit of csrc/cpu (scalar, AVX2, AVX-512 with the host compiler; NEON with
the aarch64 cross compiler, where present) with the extension's flags, disassembles the path's
accumulate_normals and counts the instructions of its main loop (the loop with the largest body: one
step of kUnroll * kLanes Philox blocks = 4 * kUnroll * kLanes element-seeds of one seed).  Also reports,
per object, any fused multiply-add (there must be none: the spec's floats are separate mul and add),
the float operations and the stack accesses in the loop (register spills).

The Rademacher family (issue 12) gets a second table: the main loop of signs_pass<kSignGroup, false> (one
32-element sign word of the accumulator and kSignGroup seeds: its float adds are the element-seed terms,
kLanes each), plus the
Philox words it needs (philox_words' loop: kLanes blocks = 128 * kLanes element-seeds of one seed).

A static count, not a measurement: no hardware is needed, and it does not depend on the load.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CPU = os.path.join(ROOT, "csrc", "cpu")
FLAGS = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-fast-math"]  # as setup.py

# path -> (translation unit, vector header, x86 or aarch64)
PATHS = {
    "scalar": ("kseed_cpu_scalar.cpp", "vec_scalar-inl.h", "x86"),
    "avx2": ("kseed_cpu_avx2.cpp", "vec_avx2-inl.h", "x86"),
    "avx512": ("kseed_cpu_avx512.cpp", "vec_avx512-inl.h", "x86"),
    "neon": ("kseed_cpu_neon.cpp", "vec_neon-inl.h", "aarch64"),
}
FMA = {"x86": re.compile(r"^v?f(n)?m(add|sub)"),
       "aarch64": re.compile(r"^(fmla|fmls|fmadd|fmsub|fnmadd|fnmsub)$")}
FLOAT_OP = {"x86": re.compile(r"^v?(mul|add|sub|sqrt)(ps|ss)$"),
            "aarch64": re.compile(r"^(fmul|fadd|fsub|fsqrt)$")}
FLOAT_ADD = {"x86": re.compile(r"^v?add(ps|ss)$"), "aarch64": re.compile(r"^fadd$")}
X86_BRANCH = re.compile(r"^j[a-z]+$")
A64_BRANCH = re.compile(r"^(b|b\.[a-z]+|cbn?z|tbn?z)$")
STACK = {"x86": re.compile(r"\(%rsp\)|\(%rbp\)|%rsp\)"), "aarch64": re.compile(r"\[sp")}


def vector_constants(header):
    text = open(os.path.join(CPU, header)).read()
    lanes = int(re.search(r"constexpr int kLanes = (\d+);", text).group(1))
    unroll = int(re.search(r"constexpr int kUnroll = (\d+);", text).group(1))
    group = int(re.search(r"constexpr int kSignGroup = (\d+);", text).group(1))
    return lanes, unroll, group


def disassemble(cxx, objdump, src, out):
    subprocess.run([cxx, *FLAGS, "-I", os.path.join(ROOT, "csrc"), "-c", src, "-o", out], check=True)
    return subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", out], check=True,
                          capture_output=True, text=True).stdout


def function(listing, name):
    """[(address, mnemonic, operands)] of the function whose demangled name starts with `name`."""
    out, inside = [], False
    for line in listing.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            inside = head.group(1).startswith(name)
            continue
        m = re.match(r"^\s*([0-9a-f]+):\s+(\S+)\s*(.*)$", line)
        if inside and m:
            out.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def main_loop(insns, arch):
    """The instructions of the hot loop: the largest loop that holds no other loop (a backward jump that
    encloses loops is the control flow around them).  Also whether any loop was left out that way."""
    is_branch = X86_BRANCH if arch == "x86" else A64_BRANCH
    index = {a: i for i, (a, _, _) in enumerate(insns)}
    loops = []
    for i, (addr, mn, ops) in enumerate(insns):
        if is_branch.match(mn):
            t = re.search(r"\b([0-9a-f]+) <", ops)
            if t and int(t.group(1), 16) <= addr and int(t.group(1), 16) in index:
                loops.append((index[int(t.group(1), 16)], i))
    if not loops:
        return [], False
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    lo, hi = max(inner, key=lambda l: l[1] - l[0])
    return insns[lo:hi + 1], False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    ap.add_argument("--objdump", default="objdump")
    ap.add_argument("--aarch64-cxx", default="aarch64-linux-gnu-g++")
    ap.add_argument("--aarch64-objdump", default="aarch64-linux-gnu-objdump")
    ap.add_argument("--show", metavar="PATH", help="also print that path's main loop (PATH-rademacher: its "
                    "Rademacher sign loop)")
    args = ap.parse_args()
    host_x86 = os.uname().machine in ("x86_64", "AMD64")
    tools = {"x86": (args.cxx, args.objdump) if host_x86 else None,
             "aarch64": (args.aarch64_cxx, args.aarch64_objdump)}
    if not host_x86:  # a native aarch64 host compiles NEON with its own compiler
        tools["aarch64"] = (args.cxx, args.objdump)

    rows, rad_rows, notes = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for path, (tu, header, arch) in PATHS.items():
            tool = tools[arch]
            if tool is None or not all(shutil.which(t) for t in tool):
                notes.append(f"{path}: skipped ({arch} compiler / objdump not found)")
                continue
            lanes, unroll, group = vector_constants(header)
            listing = disassemble(*tool, os.path.join(CPU, tu), os.path.join(tmp, path + ".o"))
            fma_all = sum(1 for line in listing.splitlines()
                          if (m := re.match(r"^\s*[0-9a-f]+:\s+(\S+)", line)) and FMA[arch].match(m.group(1)))
            loop, nested = main_loop(function(listing, f"kseed::cpu::{path}::accumulate_normals("), arch)
            if not loop:
                notes.append(f"{path}: no loop found in accumulate_normals")
                continue
            es = 4 * lanes * unroll
            fl = sum(1 for _, mn, _ in loop if FLOAT_OP[arch].match(mn))
            st = sum(1 for _, _, ops in loop if STACK[arch].search(ops))
            rows.append((path, arch, lanes, unroll, len(loop), es, len(loop) / es, fl / es, st, fma_all))
            if args.show == path:
                for addr, mn, ops in loop:
                    print(f"{addr:8x}  {mn:12} {ops}")
            # Rademacher: the sign pass of 8 seeds, and the Philox words behind it
            sloop, _ = main_loop(function(listing, f"void kseed::cpu::{path}::signs_pass<{group}, false>("), arch)
            ploop, _ = main_loop(function(listing, f"kseed::cpu::{path}::philox_words("), arch)
            adds = sum(1 for _, mn, _ in sloop if FLOAT_ADD[arch].match(mn))
            if not sloop or not adds or not ploop:
                notes.append(f"{path}: Rademacher loops not found")
                continue
            # a scalar add is one element-seed; a vector add kLanes (the scalar path's loop may be partial)
            ses = adds * lanes
            sst = sum(1 for _, _, ops in sloop if STACK[arch].search(ops))
            per_sign = len(sloop) / ses
            per_philox = len(ploop) / (128 * lanes)
            rad_rows.append((path, group, len(sloop), ses, per_sign, len(ploop), per_philox, per_sign + per_philox, sst))
            if args.show == path + "-rademacher":
                for addr, mn, ops in sloop:
                    print(f"{addr:8x}  {mn:12} {ops}")
    print(f"{'path':8} {'arch':8} {'lanes':>5} {'unroll':>6} {'loop insns':>10} {'elem-seeds':>10} "
          f"{'insns/elem-seed':>15} {'float ops/e-s':>13} {'stack refs':>10} {'fma in object':>13}")
    for p, a, la, u, n, es, per, flo, st, fma in rows:
        print(f"{p:8} {a:8} {la:5d} {u:6d} {n:10d} {es:10d} {per:15.2f} {flo:13.2f} {st:10d} {fma:13d}")
    if rad_rows:
        print()
        print("Rademacher (signs_pass<kSignGroup, false> main loop + philox_words loop, per element-seed):")
        print(f"{'path':8} {'seeds':>5} {'sign insns':>10} {'elem-seeds':>10} {'sign/e-s':>9} {'philox insns':>12} "
              f"{'philox/e-s':>10} {'total/e-s':>9} {'stack refs':>10}")
        for p, g, n, es, per, pn, pp, tot, st in rad_rows:
            print(f"{p:8} {g:5d} {n:10d} {es:10d} {per:9.3f} {pn:12d} {pp:10.3f} {tot:9.3f} {st:10d}")
        gauss = {r[0]: r[6] for r in rows}
        ratios = [f"{p} {gauss[p] / tot:.0f}x" for p, *_, tot, _ in rad_rows if p in gauss]
        if ratios:
            print("Gaussian / Rademacher instructions per element-seed: " + ", ".join(ratios))
    for n in notes:
        print("note:", n)
    return 1 if any(r[-1] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
