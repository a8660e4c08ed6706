import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "python")):
    if p not in sys.path:
        sys.path.insert(0, p)


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
