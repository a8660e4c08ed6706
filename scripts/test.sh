#!/usr/bin/env bash
# Set up kseed with its test dependencies and run every test: pytest, then the C++ tests through ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
KSEED_EXTRAS=${KSEED_EXTRAS:-test,flower,flower-simulation} bash scripts/install.sh

echo "== pytest"
"$PY" -m pytest -q -ra tests "$@"

if [[ -f CMakeLists.txt ]]; then
  echo "== ctest"
  build=${KSEED_CMAKE_BUILD:-build/cmake}
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" -j 2
  ctest --test-dir "$build" --output-on-failure
fi
