#!/usr/bin/env bash
# Set up kseed with its test dependencies and run every test: pytest, then the C++ tests through ctest.
# The test tools are pinned by constraints/test.txt (KSEED_CONSTRAINTS= picks another file; empty: none).
# PYTHON=... picks the interpreter; arguments go to pytest.
# pytest runs on KSEED_TEST_WORKERS processes (pytest-xdist; default 2, the CI machine's cores): each
# test file whole on one worker (its module-scoped fixtures run once), the longest files first
# (tests/conftest.py).  KSEED_TEST_WORKERS=0 (or the argument -n 0) runs the suite in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
t0=$(date +%s)
KSEED_CONSTRAINTS=${KSEED_CONSTRAINTS-constraints/test.txt} \
  KSEED_EXTRAS=${KSEED_EXTRAS:-test,flower,flower-simulation,hf,tensorboard,lora} bash scripts/install.sh
echo "== environment ready in $(( $(date +%s) - t0 )) s ($("$PY" -c 'import sys; print(sys.prefix)'))"

workers=${KSEED_TEST_WORKERS:-2}
xdist=(-n "$workers")
[[ "$workers" != 0 ]] && xdist+=(--dist loadfile --no-loadscope-reorder)
echo "== pytest -q -ra ${xdist[*]} tests $*"
rc=0
"$PY" -m pytest -q -ra "${xdist[@]}" tests "$@" || rc=$?
if (( rc == 5 )); then
  echo "test.sh: pytest collected no tests (exit 5): that is a failure, not a pass" >&2
  exit 1
elif (( rc != 0 )); then
  exit "$rc"
fi

if [[ -f CMakeLists.txt ]]; then
  echo "== ctest"
  build=${KSEED_CMAKE_BUILD:-build/cmake}
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" -j 2
  ctest --test-dir "$build" --output-on-failure --no-tests=error
fi
