"""Compile checks of the CUDA backend that need nvcc but no GPU.

1. The torch-free kernels (csrc/cuda/kseed_cuda_kernels.cu) build for sm_80 and sm_90 with the
   project's flags, through CMake (the top-level project with -DKSEED_CUDA_CHECK=ON when it includes
   csrc/cuda, else csrc/cuda on its own).  Warnings are errors.  The kernels' helpers are also built
   for the host (csrc/cuda/check/kseed_cuda_host_check.cu) and checked on the CPU: Philox with
   precomputed round keys, bf16 / fp16 rounding, float16 decoding.
2. The generated PTX keeps the spec's arithmetic: no fused multiply-add, no flush-to-zero, and the
   square roots are the correctly rounded sqrt.rn.
3. The torch binding (csrc/cuda/kseed_cuda_ops.cpp) passes a C++ syntax check against the installed
   torch headers (skipped when those lack the c10/cuda headers).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")


def _nvcc():
    for cand in (os.environ.get("CUDACXX"), "/usr/local/cuda/bin/nvcc", shutil.which("nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")


def _run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc


@needs_nvcc
def test_cuda_kernels_build_with_cmake(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    top = os.path.join(ROOT, "CMakeLists.txt")
    use_top = os.path.exists(top) and "csrc/cuda" in open(top).read()
    src = ROOT if use_top else CUDA_DIR
    build = str(tmp_path / "build")
    cfg = ["cmake", "-S", src, "-B", build, f"-DCMAKE_CUDA_COMPILER={NVCC}"]
    if use_top:
        cfg.append("-DKSEED_CUDA_CHECK=ON")
    _run(cfg)
    _run(["cmake", "--build", build, "--target", "kseed_cuda_check"])
    _run(["cmake", "--build", build, "--target", "kseed_cuda_host_check"])
    exe = None
    for dirpath, _, files in os.walk(build):
        if "kseed_cuda_host_check" in files:
            exe = os.path.join(dirpath, "kseed_cuda_host_check")
    assert exe is not None, "kseed_cuda_host_check was not built"
    out = _run([exe]).stdout
    assert "OK" in out, out


# The project's floating-point flags for nvcc (setup.py and csrc/cuda/CMakeLists.txt use the same).
NVCC_FP_FLAGS = ["--fmad=false", "-ftz=false"]


def test_builds_keep_subnormals_explicitly():
    """-ftz=false is spelled out in every build of the .cu files (a default can change)."""
    cmake = open(os.path.join(CUDA_DIR, "CMakeLists.txt")).read()
    assert cmake.count("--fmad=false -ftz=false") == 2, "the CUDA targets of CMakeLists.txt"
    setup = open(os.path.join(ROOT, "setup.py")).read()
    assert '"--fmad=false", "-ftz=false"' in setup, "setup.py's nvcc flags"


def _ptx(tmp_path, *extra) -> str:
    ptx = str(tmp_path / "k.ptx")
    _run([NVCC, "-std=c++17", "-O3", *NVCC_FP_FLAGS, "-DKSEED_WITH_CUDA", "-arch=sm_90", "-ptx",
          *extra, os.path.join(CUDA_DIR, "kseed_cuda_kernels.cu"), "-o", ptx])
    return open(ptx).read()


@needs_nvcc
def test_ftz_is_detected(tmp_path):
    """The .ftz check below can fail: a build with -ftz=true (the last flag wins) has .ftz ops."""
    assert ".ftz" in _ptx(tmp_path, "-ftz=true")


@needs_nvcc
def test_ptx_has_no_fma_and_no_ftz(tmp_path):
    text = _ptx(tmp_path)
    assert ".entry" in text
    assert not re.search(r"\bfma\.rn\.f32\b", text), "an fma.rn.f32 slipped into the kernels"
    assert ".ftz" not in text, "flush-to-zero arithmetic in the kernels"
    assert "sqrt.rn.f32" in text and "sqrt.approx" not in text
    assert "mul.rn.f32" in text and "add.rn.f32" in text


def _ptx_entries(text: str) -> dict:
    """{entry name: its PTX body} of a PTX module."""
    parts = re.split(r"^\.(?:visible\s+)?\.?entry\s+", text, flags=re.M)
    out = {}
    for part in parts[1:]:
        name = re.match(r"([\w$]+)", part).group(1)
        out[name] = part
    return out


@needs_nvcc
def test_ptx_rademacher_variants(tmp_path):
    """Every apply variant exists for both noise families (template argument NOISE, the last one), plus
    the rademacher generator and both floors; the Rademacher variants compute no normal (no sqrt, no
    float multiply outside the float16 stochastic rounding) and keep the spec's adds."""
    entries = _ptx_entries(_ptx(tmp_path))
    apply = {n: b for n, b in entries.items() if "apply_kernel" in n}
    # 5 (dtype, rounding) pairs x aligned or not x 2 families
    assert len(apply) == 20, sorted(apply)
    rad = {n: b for n, b in apply.items() if re.search(r"ELi1EEEv", n)}
    assert len(rad) == 10, sorted(rad)
    for name, body in rad.items():
        assert "sqrt" not in body, name
        assert "add.rn.f32" in body, name
        assert "fma" not in body, name
        if "DTypeE2ELi1E" not in name:  # only the fp16 stochastic rounding multiplies
            assert "mul.rn.f32" not in body, name
    floors = [n for n in entries if "noise_floor_kernel" in n]
    assert len(floors) == 2, floors
    assert any("rademacher_kernel" in n for n in entries)


def test_binding_syntax(tmp_path):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        pytest.skip("torch not installed")
    incs = include_paths()
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "CUDAStream.h")) for p in incs):
        pytest.skip("the installed torch has no c10/cuda headers")
    cuda_inc = None
    for cand in ("/usr/local/cuda/include", os.path.join(os.path.dirname(os.path.dirname(NVCC or "")),
                                                          "include")):
        if cand and os.path.exists(os.path.join(cand, "cuda_runtime.h")):
            cuda_inc = cand
            break
    if cuda_inc is None:
        pytest.skip("cuda_runtime.h not found")
    # A CPU build of torch ships the c10/cuda headers but not the generated cuda_cmake_macros.h.
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [gxx, "-std=c++17", "-fsyntax-only", "-Wno-c++20-extensions", "-DKSEED_WITH_CUDA"]
    cmd += [f"-I{p}" for p in incs] + [f"-I{tmp_path / 'stub'}", f"-I{cuda_inc}"]
    cmd.append(os.path.join(CUDA_DIR, "kseed_cuda_ops.cpp"))
    _run(cmd)
