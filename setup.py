"""Build kseed: the kseed_kernels package with its compiled extension kseed_kernels._C, and the driver.

The extension is built against the torch already installed (pip install --no-build-isolation): a CPU
torch gives a CppExtension, a CUDA torch a CUDAExtension that adds csrc/cuda.  KSEED_BUILD_CUDA=0 forces
a CPU-only build.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
except ImportError:  # an isolated build env has no torch: say how to build instead
    sys.exit("kseed builds against the torch you have installed. Install torch first "
             "(pip install torch==2.13.0 gives the CPU build), then: "
             "pip install --no-build-isolation .")

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def extension():
    want_cuda = os.environ.get("KSEED_BUILD_CUDA", "1") != "0"
    use_cuda = want_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    sources = _rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) +
                   glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))
    # Floats must be the spec's IEEE operations: no contraction into fma, no fast-math.
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-fopenmp"]
    if use_cuda:
        sources += _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        sources += _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp")))
        # No fma contraction and no flush-to-zero (subnormals are kept, docs/SPEC.md): the same flags
        # as csrc/cuda/CMakeLists.txt and tests/test_cuda_compile.py.
        nvcc = ["-O3", "-std=c++17", "--fmad=false", "-ftz=false", "-DKSEED_WITH_CUDA"]
        # py_limited_api: no pybind11 and only Python's limited API (csrc/registration.cpp; torch
        # defines Py_LIMITED_API), so one wheel serves every CPython >= 3.10 (abi3; torch sets Py_LIMITED_API to 3.10), as
        # pytorch/extension-cpp does.
        return CUDAExtension("kseed_kernels._C", sources,
                             extra_compile_args={"cxx": cxx + ["-DKSEED_WITH_CUDA"], "nvcc": nvcc},
                             extra_link_args=["-fopenmp"], py_limited_api=True)
    return CppExtension("kseed_kernels._C", sources, extra_compile_args={"cxx": cxx},
                        extra_link_args=["-fopenmp"], py_limited_api=True)


setup(
    name="kseed",
    version="0.1.0",
    description="Seed-based zeroth-order federated fine-tuning (FedKSeed) with fused Philox kernels",
    # kseed_kernels and its backend folders from the top level, the driver kseed from python/.
    packages=find_packages(where=HERE, include=["kseed_kernels", "kseed_kernels.*"]) +
    ["kseed"] + ["kseed." + p for p in find_packages(where=os.path.join(HERE, "python", "kseed"))],
    package_dir={"kseed": "python/kseed"},
    include_package_data=True,
    package_data={"kseed_kernels": ["data/*"], "kseed": ["data/*", "data/**/*", "flower/app/*"]},
    ext_modules=[extension()] if glob.glob(os.path.join(HERE, "csrc", "*.cpp")) else [],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "transformers>=4.40", "tokenizers", "safetensors",
                      "tqdm", "matplotlib", "rouge-score"],
    entry_points={"console_scripts": ["kseed-fed=kseed.cli:main",
                                      "kseed-flower=kseed.flower.__main__:main"]},
    extras_require={
        "triton": ["triton==3.9.0"],
        "flower": ["flwr==1.41.0"],
        # Flower's simulation engine (many virtual clients in parallel); flwr 1.41.0 pins ray 2.55.1
        "flower-simulation": ["flwr[simulation]==1.41.0", "ray==2.55.1"],
        # ORG/NAME data sets, save_to_disk directories, parquet / csv / json files (--data)
        "hf": ["datasets"],
        # --tensorboard DIR (torch.utils.tensorboard's SummaryWriter)
        "tensorboard": ["tensorboard"],
        # --method fedit / fedpipe: LoRA adapters through peft (kseed.lora); FedPipe's quantized
        # frozen models through bitsandbytes (int8 weight-only and NF4, CPU backend included)
        "lora": ["peft", "bitsandbytes"],
        # pytest-xdist: scripts/test.sh runs the suite on two processes
        "test": ["pytest", "pytest-xdist", "scipy", "triton==3.9.0"],
    },
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    zip_safe=False,
)
