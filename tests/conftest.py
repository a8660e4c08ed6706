import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "python")):
    if p not in sys.path:
        sys.path.insert(0, p)


# ----------------------------------------------------------------------------- pytest-xdist
# scripts/test.sh runs the suite on KSEED_TEST_WORKERS processes (pytest-xdist, ``--dist loadfile
# --no-loadscope-reorder``): each test file runs whole on one worker, so a module-scoped fixture (the
# Triton interpreter child, the Flower deployment, the AOT compiles) runs once.  (``--dist loadgroup``
# with per-test groups would balance finer, but xdist 3.8 marks a group by rewriting ``item._nodeid``,
# which pytest 9 no longer reads: every test would be scheduled alone.)  The hooks below change no test;
# a serial run (``-n 0``) is as before.
#
# The files start longest first, so no worker is left alone with a long one at the end: these, in this
# order, then the others in collection order.  Seconds: `pytest --durations` of a serial run on the
# 2-core machine (loaded by other jobs), setup + calls.
SLOW_FILES = (
    "tests/test_flower.py",  # the shared deployment and its runs, the fault, TLS: 560 s
    "tests/test_triton_aot.py",  # PTX and cubins for sm_90 and sm_80, disassembled: 510 s
    "tests/test_triton.py",  # the interpreter child: 320 s
    "tests/test_flower_sim.py",  # Flower's simulation engine (Ray): 205 s
    "tests/test_adversarial.py",  # 100 s
    "tests/test_driver_noise_convergence.py",  # 90 s
    "tests/test_flower_local.py",  # 70 s
    "tests/test_cuda_compile.py",  # 50 s
    "tests/test_methods_lora.py",
    "tests/test_history.py",
    "tests/test_cuda_emu.py",
    "tests/test_compare_methods.py",
    "tests/test_flower_methods.py",
    "tests/test_memory.py",
)


def pytest_configure(config):
    # Every worker is a torch process of its own: one thread each, so that two workers on two cores do
    # not oversubscribe them (tests that need another thread count set it themselves, as serially).
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0) > 1:
        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # serial, or xdist's controller: keep the collection order

    def rank(item):
        path = item.nodeid.split("::", 1)[0]
        return SLOW_FILES.index(path) if path in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: the order within a file, and among the other files, is kept


@pytest.fixture
def gen(request):
    """A torch.Generator seeded from the test's name: fresh inputs per test, reproducible runs."""
    import zlib

    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("KSEED_TEST_SEED", "0")))
    return g


@pytest.fixture
def one_thread():
    """torch on one thread for the test (restored after): the embedded model's ops are too small for
    two threads, as kseed-fed sets it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cpu_backends():
    """Usable backends that serve CPU tensors, the reference excluded (triton runs in its own tests)."""
    import kseed_kernels

    return [b for b in kseed_kernels.backends() if b not in ("reference", "triton", "cuda")]


def run_whole_and_resumed(cfg, tmp_path, stop_after):
    """The bitwise-resume setting of the method tests: ``cfg`` run whole into tmp_path/a, and into
    tmp_path/b stopped after ``stop_after`` rounds, then resumed to the end; returns (a, b)."""
    from kseed import simulation as S
    from kseed.config import FedConfig

    a, b = tmp_path / "a", tmp_path / "b"
    S.run(cfg, str(a), progress=False)
    S.run(FedConfig(**{**cfg.to_dict(), "rounds": stop_after}), str(b), progress=False)
    S.run(cfg, str(b), resume=True, progress=False)
    return a, b
