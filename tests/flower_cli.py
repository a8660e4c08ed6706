"""Run `python -m kseed.flower ...` in a subprocess for the tests, and clean up after it."""
import subprocess
import sys
from pathlib import Path

import pytest

from kseed.flower.deploy import marked_processes, stop_marked


def run_kseed_flower(command, workdir, args, *, env=None, timeout=300):
    """`python -m kseed.flower COMMAND --workdir WORKDIR ARGS...` with this interpreter: the finished
    process (output captured).  Fails the test on timeout; either way stops every process the run
    left behind (those carrying FLWR_HOME=WORKDIR/flwr-home) and checks none is left."""
    home = Path(workdir) / "flwr-home"
    cmd = [sys.executable, "-m", "kseed.flower", command, "--workdir", str(workdir), *args]
    try:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(cmd)} still running after {timeout} s:\n{(exc.stderr or b'')[-3000:]}")
    finally:
        stop_marked(home)
        assert marked_processes(home) == [], "processes left behind"
