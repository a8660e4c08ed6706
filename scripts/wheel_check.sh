#!/usr/bin/env bash
# CI: kseed installs and runs from its wheel, not only from the source tree.
#   1. build the wheel against the installed torch (pip wheel --no-build-isolation, as the README says);
#   2. install it into a fresh virtual environment that sees this Python's packages (torch,
#      transformers, flwr, ...: scripts/venv_overlay.py, from a venv, the system Python or conda alike)
#      but runs from outside the checkout, and check that kseed, kseed_kernels and the compiled
#      kseed_kernels._C, the embedded model and the Flower app dir all come from the wheel;
#   3. run kseed-fed there for one short round on the embedded default.
# Usage: bash scripts/wheel_check.sh   (PYTHON=... picks the interpreter; KEEP=1 keeps the temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/kseed-wheel.XXXXXX")
[[ "${KEEP:-0}" == 1 ]] || trap 'rm -rf "$work"' EXIT
t0=$(date +%s)
lap() { echo "   ($(( $(date +%s) - t0 )) s)"; }

# The build tools a --no-build-isolation build uses from this environment (torch is never touched).
KSEED_CONSTRAINTS=${KSEED_CONSTRAINTS-constraints/test.txt} bash scripts/install.sh --build-tools-only

echo "== wheel: build"
"$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" .
whl=$(ls "$work"/dist/kseed-*.whl)
echo "built $(basename "$whl")"; lap
"$PY" - "$whl" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = {"the compiled ops": lambda n: n.startswith("kseed_kernels/_C") and n.endswith(".so"),
        "the embedded model": lambda n: n.startswith("kseed/data/") and n.endswith(".safetensors"),
        "the Flower app dir": lambda n: n.startswith("kseed/flower/app/"),
        "every backend folder": lambda n: n == "kseed_kernels/backends/triton/kernels.py"}
missing = [what for what, ok in need.items() if not any(map(ok, names))]
if missing:
    sys.exit(f"wheel_check: the wheel lacks {', '.join(missing)}")
print(f"wheel holds {len(names)} files")
PYEOF

echo "== wheel: install into a fresh virtual environment"
# Not venv's system_site_packages: from inside a venv that builds on the base installation, which may
# not have torch at all. The overlay sees this interpreter's own site directories.
"$PY" scripts/venv_overlay.py "$work/venv"
VPY="$work/venv/bin/python"
unset PYTHONPATH  # nothing from the source tree
# pip is this Python's (seen through the overlay); it installs into the new venv. --ignore-installed:
# a kseed installed in this Python (editable, say) is neither consulted nor touched.
"$VPY" -m pip install -q --no-deps --no-build-isolation --ignore-installed "$whl"
lap

cd "$work"  # outside the checkout: nothing may come from the source tree
"$VPY" - "$work/venv" "$ROOT" <<'PYEOF'
import os, subprocess, sys
venv, root = (os.path.realpath(p) for p in sys.argv[1:])
import kseed, kseed.flower, kseed_kernels, kseed_kernels._C
for mod in (kseed, kseed_kernels, kseed_kernels._C):
    path = os.path.realpath(mod.__file__)
    if not path.startswith(venv + os.sep) or path.startswith(root + os.sep):
        sys.exit(f"wheel_check: {mod.__name__} comes from {path}, not from the wheel in {venv}")
print("backends:", ", ".join(kseed_kernels.backends()))
app = subprocess.run([sys.executable, "-m", "kseed.flower", "appdir"], capture_output=True, text=True,
                     check=True).stdout.strip().splitlines()[-1]
if not os.path.realpath(app).startswith(venv + os.sep) or not os.listdir(app):
    sys.exit(f"wheel_check: the Flower app dir {app} is not the wheel's")
print("flower app dir:", app)
PYEOF

echo "== wheel: kseed-fed, one round"
"$work/venv/bin/kseed-fed" --rounds 1 --num-clients 2 --clients-per-round 1 --local-steps 2 -K 16 \
  --eval-size 8 --rouge-size 2 --max-new-tokens 4 --threads 2 --quiet --out "$work/run"
test -s "$work/run/summary.json" || { echo "wheel_check: kseed-fed wrote no summary.json"; exit 1; }
echo "wheel_check: OK ($(( $(date +%s) - t0 )) s)"
