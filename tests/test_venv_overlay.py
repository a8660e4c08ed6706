"""scripts/venv_overlay.py: the fresh environment scripts/wheel_check.sh installs the wheel into.

It must see the calling interpreter's packages (torch & co., without downloading them) from a venv
too: venv's system_site_packages from inside a venv builds on the base installation instead.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "venv_overlay.py")
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def _py(env_dir):
    return os.path.join(env_dir, "bin", "python")


def _run(py, code):
    return subprocess.run([py, "-c", code], check=True, capture_output=True, text=True, env=ENV,
                          cwd=os.path.dirname(py)).stdout.strip()


def _overlay(caller, target):
    subprocess.run([caller, SCRIPT, str(target)], check=True, capture_output=True, text=True, env=ENV)
    return _py(str(target))


def _own_site(py):
    return _run(py, "import site; print(site.getsitepackages()[0])")


def test_overlay_sees_the_callers_packages_from_a_venv_and_its_own_first(tmp_path):
    probe = "import kseed_overlay_probe as p; print(p.WHERE)"
    torch_file = _run(sys.executable, "import torch; print(torch.__file__)")
    a = _overlay(sys.executable, tmp_path / "a")
    assert _run(a, "import sys; print(sys.prefix)") == str(tmp_path / "a")
    assert _run(a, "import torch; print(torch.__file__)") == torch_file
    # a module that only the venv `a` holds: a venv made from `a` must see it (built on the base
    # installation, as venv's system_site_packages does, it would not)
    with open(os.path.join(_own_site(a), "kseed_overlay_probe.py"), "w") as f:
        f.write("WHERE = 'a'\n")
    b = _overlay(a, tmp_path / "b")
    assert _run(b, probe) == "a"
    assert _run(b, "import torch; print(torch.__file__)") == torch_file
    assert _run(b, "import sys; print(sys.prefix)") == str(tmp_path / "b")
    # what is installed into the new environment itself wins over the caller's
    with open(os.path.join(_own_site(b), "kseed_overlay_probe.py"), "w") as f:
        f.write("WHERE = 'b'\n")
    assert _run(b, probe) == "b"
    assert _run(a, probe) == "a"
