#!/usr/bin/env bash
# Set up kseed on this machine: torch (only if none is installed), then kseed built against it.
#   bash scripts/install.sh            # the package, its driver and the compiled CPU kernels
#   KSEED_EXTRAS=test bash scripts/install.sh   # plus what the tests need (pytest, scipy, triton)
#   bash scripts/install.sh --build-tools-only  # only the build tools (scripts/wheel_check.sh uses it)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# A --no-build-isolation build uses this environment's build tools. setuptools' wheel builder needs the
# `wheel` package before setuptools 70.1 (a fresh Python 3.11 venv has setuptools 65.5 and no wheel,
# and pip then stops with "invalid command 'bdist_wheel'"); ninja makes the C++ build parallel.
"$PY" -m pip install -q "setuptools>=64" wheel ninja
[[ "${1:-}" == "--build-tools-only" ]] && exit 0

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # No torch yet: take 2.13.0 (a CPU build where the index offers one). An installed torch is never replaced.
  "$PY" -m pip install "torch==2.13.0"
fi
extras=${KSEED_EXTRAS:-}
spec="."
[[ -n "$extras" ]] && spec=".[${extras}]"
# --no-build-isolation: build against the installed torch instead of downloading another one.
"$PY" -m pip install --no-build-isolation -e "$spec"
"$PY" -c "import kseed_kernels; print('kseed installed; backends:', ', '.join(kseed_kernels.backends()))"
