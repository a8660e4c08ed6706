#!/usr/bin/env bash
# Set up kseed on this machine: torch (only if none is installed), then kseed built against it.
#   bash scripts/install.sh            # the package, its driver and the compiled CPU kernels
#   KSEED_EXTRAS=test bash scripts/install.sh   # plus what the tests need (pytest, scipy, triton)
#   bash scripts/install.sh --build-tools-only  # only the build tools (scripts/wheel_check.sh uses it)
# KSEED_CONSTRAINTS=FILE passes FILE to every pip install here as a constraints file (pip -c; on top of
# any constraints in pip's own configuration): scripts/test.sh and .ci/run use constraints/test.txt.
set -euo pipefail
PY=${PYTHON:-python3}
pip_install=("$PY" -m pip install)
if [[ -n "${KSEED_CONSTRAINTS:-}" ]]; then
  [[ -f "$KSEED_CONSTRAINTS" ]] || { echo "install.sh: KSEED_CONSTRAINTS=$KSEED_CONSTRAINTS: no such file" >&2; exit 2; }
  pip_install+=(-c "$(realpath "$KSEED_CONSTRAINTS")")
fi
cd "$(dirname "$0")/.."

# A --no-build-isolation build uses this environment's build tools. setuptools' wheel builder needs the
# `wheel` package before setuptools 70.1 (a fresh Python 3.11 venv has setuptools 65.5 and no wheel,
# and pip then stops with "invalid command 'bdist_wheel'"); ninja makes the C++ build parallel.
"${pip_install[@]}" -q "setuptools>=64" wheel ninja
[[ "${1:-}" == "--build-tools-only" ]] && exit 0

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # No torch yet: take 2.13.0 (a CPU build where the index offers one). An installed torch is never replaced.
  "${pip_install[@]}" "torch==2.13.0"
fi
extras=${KSEED_EXTRAS:-}
spec="."
[[ -n "$extras" ]] && spec=".[${extras}]"
# --no-build-isolation: build against the installed torch instead of downloading another one.
"${pip_install[@]}" --no-build-isolation -e "$spec"
"$PY" -c "import kseed_kernels; print('kseed installed; backends:', ', '.join(kseed_kernels.backends()))"
