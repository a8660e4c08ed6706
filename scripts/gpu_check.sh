#!/usr/bin/env bash
# The GPU check of kseed in one command, on a machine with a CUDA GPU and a CUDA build of torch:
#   1. build kseed_kernels._C in place with its CUDA part (setup.py build_ext --inplace: no network, nothing
#      installed, the installed torch untouched), then check that the "cuda" and "triton" backends work;
#   2. the GPU tests: tests/test_cuda.py, the GPU half of tests/test_triton.py, tests/test_opcheck.py (its
#      CUDA cases); a skipped one counts as a failure (the GPU-free tests are scripts/test.sh's);
#   3. the GPU benchmarks, bench/bench_gpu_{apply,rebuild,zo_step,project}.py, at their default sizes;
#   3b. memory: bench/bench_gpu_memory.py, torch.cuda.max_memory_allocated beyond the model's bytes around a
#      rebuild (w0 stays in host memory), a snapshot restore and ZO steps of a 0.17B bf16 LLaMA (issue #11);
#   4. with --ncu, an Nsight Compute profile of the apply kernels (cuda, triton) at K = 1024.
# Everything goes to one folder, at most 10 files: summary.txt (machine, versions, commit, the step table),
# build.log, tests.log, bench_apply.log, bench_rebuild.log, bench_zo_step.log, bench_project.log,
# bench_memory.log, ncu.log, ncu_apply.ncu-rep.
# A failing step does not stop the others.  Exit status: 0 if every step passed, 1 if one failed or ran
# out of time, 2 if there is no GPU or an option is wrong.  The default run is meant to fit in under 10
# minutes on an H100 (not yet timed on one); each step has a time limit and the whole run ends within
# --budget seconds, summary written.
#
#   bash scripts/gpu_check.sh                  # everything, into $OUT if set, else ./gpu_check_out
#   bash scripts/gpu_check.sh --tests-only     # build, check, GPU tests
#   bash scripts/gpu_check.sh --bench-only     # build, check, benchmarks (memory included)
#   bash scripts/gpu_check.sh --only build,check,ncu   # the ncu profile alone
#   bash scripts/gpu_check.sh --smoke          # no GPU needed: the plumbing, the benchmarks' --smoke modes
#
# Options: --out DIR; --only STEPS (comma-separated, of: build,check,tests,apply,rebuild,zo_step,project,
#   memory,ncu);
#   --ncu (add the ncu step); --no-build (use the kseed_kernels._C already built); --quick (shorter
#   benchmarks: K = 1, 16, 1024 for apply, K = 1024 for rebuild, 5 ZO steps); --budget SECONDS (default
#   560); --tree-hash (print the hash of the source files, to match a run's summary to a checkout; exit).
# Environment: PYTHON (default python3); TORCH_CUDA_ARCH_LIST (default: this GPU's, e.g. 9.0 on an H100);
#   MAX_JOBS (default: nproc); KSEED_COMMIT (the commit to record when the tree has no .git, else the file
#   .kseed_commit is read); KSEED_PYTEST_ARGS, KSEED_APPLY_ARGS, KSEED_REBUILD_ARGS, KSEED_ZO_ARGS (extra
#   arguments, word-split); KSEED_NCU_ARGS (default: --set full --clock-control none).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}

usage() { sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

tree_hash() {  # sha256 over the source files (the same here and on a copy of the tree without .git)
  (cd "$ROOT" && find csrc kseed_kernels bench tests scripts setup.py pyproject.toml CMakeLists.txt \
      -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \
      -o -name '*.sh' -o -name '*.toml' -o -name '*.txt' -o -name '*.json' \) \
      -not -path '*/__pycache__/*' -print0 2>/dev/null | LC_ALL=C sort -z | xargs -0 sha256sum \
      | sha256sum | cut -c1-16)
}

OUTDIR=${OUT:-}
SMOKE=0 QUICK=0 NCU=0 BUILD=1 BUILD_SET=0 BUDGET=560 ONLY=""
while (($#)); do
  case $1 in
    --out) OUTDIR=${2:?--out needs a folder}; shift ;;
    --out=*) OUTDIR=${1#*=} ;;
    --only) ONLY=${2:?--only needs a list of steps}; shift ;;
    --only=*) ONLY=${1#*=} ;;
    --tests-only) ONLY=build,check,tests ;;
    --bench-only) ONLY=build,check,apply,rebuild,zo_step,project,memory ;;
    --ncu) NCU=1 ;;
    --smoke) SMOKE=1 ;;
    --quick) QUICK=1 ;;
    --no-build) BUILD=0 BUILD_SET=1 ;;
    --build) BUILD=1 BUILD_SET=1 ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    --tree-hash) tree_hash; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget takes whole seconds, got $BUDGET" >&2; exit 2; }
# Which steps run.
STEPS=(build check tests apply rebuild zo_step project memory ncu)
declare -A WANT=()
if [[ -n $ONLY ]]; then
  IFS=, read -r -a picked <<<"$ONLY"
  for s in "${picked[@]}"; do
    [[ " ${STEPS[*]} " == *" $s "* ]] || { echo "gpu_check: unknown step '$s' in --only (${STEPS[*]})" >&2; exit 2; }
    WANT[$s]=1
  done
else
  for s in build check tests apply rebuild zo_step project memory; do WANT[$s]=1; done
fi
((NCU)) && WANT[ncu]=1
((SMOKE && !BUILD_SET)) && BUILD=0  # --smoke leaves the built extension alone unless --build is given
((BUILD)) || unset 'WANT[build]'
((SMOKE)) && unset 'WANT[ncu]'

OUTDIR=${OUTDIR:-$PWD/gpu_check_out}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$ROOT" || exit 2

# Our files in the folder (at most 8); older copies of them go first.
SUMMARY=$OUTDIR/summary.txt BUILD_LOG=$OUTDIR/build.log TESTS_LOG=$OUTDIR/tests.log
APPLY_LOG=$OUTDIR/bench_apply.log REBUILD_LOG=$OUTDIR/bench_rebuild.log ZO_LOG=$OUTDIR/bench_zo_step.log
NCU_LOG=$OUTDIR/ncu.log NCU_REP=$OUTDIR/ncu_apply.ncu-rep MEM_LOG=$OUTDIR/bench_memory.log
PROJECT_LOG=$OUTDIR/bench_project.log
rm -f "$SUMMARY" "$BUILD_LOG" "$TESTS_LOG" "$APPLY_LOG" "$REBUILD_LOG" "$ZO_LOG" "$NCU_LOG" "$NCU_REP" "$MEM_LOG" \
  "$PROJECT_LOG"

export PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"  # the in-tree package, built in place
export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/kseed_gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$TMP"' EXIT

now() { if [[ -n ${EPOCHREALTIME:-} ]]; then echo "${EPOCHREALTIME/,/.}"; else date +%s.%N; fi; }
T_START=$(now)
DEADLINE=$((${T_START%.*} + BUDGET))

# ------------------------------------------------------------------------------- Python helpers
cat >"$TMP/env.py" <<'PYEOF'
import importlib.metadata as md
import sys


def ver(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not installed"


print("python:", sys.version.split()[0], "at", sys.executable)
try:
    import torch
except ImportError as exc:
    print("torch: cannot be imported:", exc)
    sys.exit(0)
print("torch:", torch.__version__, "| CUDA", torch.version.cuda, "| GPU visible:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu (torch): {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} device(s)")
try:
    from torch.utils.cpp_extension import CUDA_HOME
except Exception as exc:  # noqa: BLE001
    CUDA_HOME = f"? ({exc})"
print("CUDA_HOME (torch.utils.cpp_extension):", CUDA_HOME)
print("triton:", ver("triton"), "| transformers:", ver("transformers"), "| numpy:", ver("numpy"),
      "| pytest:", ver("pytest"), "| setuptools:", ver("setuptools"), "| ninja:", ver("ninja"))
try:
    from triton.backends.nvidia.compiler import CUDAOptions

    f = CUDAOptions.__dataclass_fields__
    print("triton knows the launch options kseed passes: enable_fp_fusion", "enable_fp_fusion" in f,
          "| enable_reflect_ftz", "enable_reflect_ftz" in f)
except Exception as exc:  # noqa: BLE001
    print("triton CUDAOptions: not readable:", type(exc).__name__, exc)
PYEOF

cat >"$TMP/gpu_arch.py" <<'PYEOF'
import sys

try:
    import torch
except ImportError as exc:
    print(f"torch cannot be imported ({exc})")
    sys.exit(1)
if torch.version.cuda is None:
    print(f"this torch ({torch.__version__}) is a CPU build; the CUDA backend needs a CUDA build of torch")
    sys.exit(1)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU")
    sys.exit(1)
print("%d.%d" % torch.cuda.get_device_capability(0))
PYEOF

cat >"$TMP/check.py" <<'PYEOF'
import sys

import torch

import kseed_kernels as kk
from kseed_kernels import _C

smoke = sys.argv[1] == "smoke"
print("kseed_kernels:", kk.__file__)
print("kseed_kernels._C:", _C.__file__)
print("usable backends:", ", ".join(kk.backends()))
try:
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("kseed::apply_seeds_", "CUDA")
except RuntimeError:
    has_cuda = False
print("CUDA kernel registered for kseed::apply_seeds_:", has_cuda)
errors = []
if "cpu" not in kk.backends():
    errors.append('backend "cpu" is not usable: kseed_kernels._C is not built')
if not smoke:
    if not has_cuda:
        errors.append("kseed_kernels._C was built WITHOUT its CUDA part (no CUDA kernel for "
                      "kseed::apply_seeds_): did torch find nvcc (CUDA_HOME in summary.txt)? "
                      "See build.log")
    for b in ("cuda", "triton"):
        if b not in kk.backends():
            errors.append(f'backend "{b}" is not usable')
            continue
        for fam in ("gaussian", "rademacher"):
            gen = getattr(kk, fam)
            z = gen(2**63 + 5, 4099, stream=7, offset=3, device="cuda", backend=b).cpu()
            r = gen(2**63 + 5, 4099, stream=7, offset=3, backend="reference")
            same = torch.equal(z.view(torch.int32), r.view(torch.int32))
            print(f"{fam} on backend {b}:", "bitwise equal to" if same else "DIFFERS from",
                  "the reference")
            if not same:
                errors.append(f'backend "{b}": {fam} differs from the reference')
for e in errors:
    print("ERROR:", e)
sys.exit(1 if errors else 0)
PYEOF

cat >"$TMP/ncu_apply.py" <<'PYEOF'
import sys

import torch

sys.path.insert(0, "bench")
import kseed_kernels as kk  # noqa: E402
from _llama_shapes import llama_shapes  # noqa: E402

K = 1024
shapes = [s for s in llama_shapes() if s[0].startswith("model.layers.0.")]  # one 1.1B layer: 44M elements
g = torch.Generator().manual_seed(0)
seeds = torch.randint(0, 2**62, (K,), generator=g, dtype=torch.int64)
coefs = (torch.randn(K, generator=g) * 1e-6).float()
streams = [kk.stream_id(n) for n, _ in shapes]
runs = []
for dtype in (torch.bfloat16, torch.float32):
    ps = [torch.empty(s, dtype=dtype, device="cuda").normal_(0, 0.02) for _, s in shapes]
    for b in ("cuda", "triton"):
        if b in kk.backends():
            kk.apply_seeds_multi_(ps, streams, seeds, coefs, backend=b)  # warm-up: Triton compiles here
            runs.append((dtype, b, ps))
torch.cuda.synchronize()
torch.cuda.profiler.start()  # ncu --profile-from-start off: only the launches below are profiled
for dtype, b, ps in runs:
    kk.apply_seeds_multi_(ps, streams, seeds, coefs, backend=b)
    torch.cuda.synchronize()
    print(f"profiled: backend {b}, {dtype}, K = {K}, {sum(p.numel() for p in ps):,} elements")
torch.cuda.profiler.stop()
PYEOF

# ------------------------------------------------------------------------------- the machine
commit_of_tree() {
  if [[ -n ${KSEED_COMMIT:-} ]]; then
    echo "$KSEED_COMMIT (KSEED_COMMIT)"
  elif git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    local c dirty=""
    c=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null)
    [[ -n $(GIT_OPTIONAL_LOCKS=0 git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]] \
      && dirty=" + uncommitted changes"
    echo "$c$dirty (git)"
  elif [[ -s $ROOT/.kseed_commit ]]; then
    echo "$(head -1 "$ROOT/.kseed_commit" | cut -c1-200) (.kseed_commit)"
  else
    echo "unknown (no .git here: set KSEED_COMMIT or write .kseed_commit)"
  fi
}

ENV_TXT=$(
  echo "date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')"
  echo "mode: $( ((SMOKE)) && echo "smoke (CPU plumbing, no GPU needed)" || echo gpu)$( ((QUICK)) && echo ", quick benchmarks")"
  echo "commit: $(commit_of_tree)"
  echo "source tree hash: $(tree_hash) (scripts/gpu_check.sh --tree-hash on a checkout: the same for the same files)"
  echo "host: $(uname -srm), $(nproc) CPUs"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | head -4 | paste -sd';')"
  else
    echo "nvidia-smi: not found"
  fi
  if command -v nvcc >/dev/null 2>&1; then
    echo "nvcc: $(command -v nvcc), $(nvcc --version 2>&1 | grep -i release | head -1)"
  else
    echo "nvcc: not on PATH"
  fi
  timeout 120 "$PY" "$TMP/env.py" 2>&1
)

# ------------------------------------------------------------------------------- step table
NAMES=() RESULTS=() SECS=() NOTES=()
record() { NAMES+=("$1"); RESULTS+=("$2"); SECS+=("$3"); NOTES+=("$4"); write_summary; }

table() {
  printf '%-8s %-7s %8s  %s\n' step result seconds note
  local i
  for i in "${!NAMES[@]}"; do
    printf '%-8s %-7s %8s  %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECS[$i]}" "${NOTES[$i]}"
  done
}

n_failed() {
  local r n=0
  for r in "${RESULTS[@]}"; do [[ $r == pass ]] || n=$((n + 1)); done
  echo "$n"
}

elapsed() { awk -v a="$T_START" -v b="$(now)" 'BEGIN { printf "%.0f", b - a }'; }

write_summary() {
  {
    echo "# kseed GPU check"
    echo "$ENV_TXT"
    echo
    table
    echo
    if [[ ${FINISHED:-0} == 1 ]]; then
      if (($(n_failed) == 0)); then echo "overall: PASS, $(elapsed) s"
      else echo "overall: FAIL ($(n_failed) of ${#NAMES[@]} steps), $(elapsed) s"; fi
    else
      echo "(still running: $(elapsed) s so far)"
    fi
  } >"$SUMMARY"
}

# run_step NAME LOG CAP CMD...: CMD under a time limit (CAP seconds, or what is left of the budget), its
# output tee'd to LOG.  Sets STEP_RC (-1: not run, no time left), STEP_SECS and STEP_LIMIT.
run_step() {
  local name=$1 log=$2 cap=$3
  shift 3
  local t0 left
  t0=$(now)
  left=$((DEADLINE - ${t0%.*} - 5))
  if ((left < 20)); then
    STEP_RC=-1 STEP_SECS=0 STEP_LIMIT=0
    echo "== $name: not run, ${left} s left of the ${BUDGET} s budget" | tee -a "$log"
    return
  fi
  STEP_LIMIT=$((cap < left ? cap : left))
  echo "== $name (limit ${STEP_LIMIT} s): $*" | tee -a "$log"
  timeout -k 15 "$STEP_LIMIT" "$@" 2>&1 | tee -a "$log"
  STEP_RC=${PIPESTATUS[0]}
  STEP_SECS=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  echo "== $name: exit status $STEP_RC after $STEP_SECS s" | tee -a "$log"
}

verdict() {  # verdict NAME NOTE_IF_PASSED: records the step from STEP_RC
  case $STEP_RC in
    0) record "$1" pass "$STEP_SECS" "${2:-}" ;;
    -1) record "$1" SKIP 0 "not run: out of the ${BUDGET} s budget" ;;
    124|137) record "$1" TIMEOUT "$STEP_SECS" "stopped at its ${STEP_LIMIT} s limit (see its log)" ;;
    *) record "$1" FAIL "$STEP_SECS" "exit status $STEP_RC (see its log)" ;;
  esac
}

write_summary
echo "$ENV_TXT"
echo "output folder: $OUTDIR"

# ------------------------------------------------------------------------------- is there a GPU
if ((!SMOKE)); then
  if ! GPU_STATE=$("$PY" "$TMP/gpu_arch.py" 2>"$TMP/gpu_arch.err"); then
    [[ -n $GPU_STATE ]] || GPU_STATE=$(tail -3 "$TMP/gpu_arch.err" | paste -sd' ')
    echo
    echo "gpu_check: no usable CUDA GPU here: $GPU_STATE."
    echo "This check needs a CUDA GPU and a CUDA build of torch. Without them, 'bash scripts/gpu_check.sh --smoke'"
    echo "runs its plumbing (CPU backends, the benchmarks' --smoke modes) and 'bash scripts/test.sh' the CPU tests."
    record gpu FAIL 0 "no usable CUDA GPU: $GPU_STATE"
    FINISHED=1 write_summary
    exit 2
  fi
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$(tail -1 <<<"$GPU_STATE")}
  export KSEED_BUILD_CUDA=1
fi

# ------------------------------------------------------------------------------- 1. build, check
if [[ -n ${WANT[build]:-} ]]; then
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<unset>} MAX_JOBS=$MAX_JOBS" \
       "KSEED_BUILD_CUDA=${KSEED_BUILD_CUDA:-<unset>}" | tee -a "$BUILD_LOG"
  # --force: setuptools skips the build when an older _C (a CPU-only one, say) is newer than the
  # sources; ninja still recompiles only what changed.
  run_step build "$BUILD_LOG" 420 "$PY" setup.py build_ext --inplace --force
  verdict build "arch ${TORCH_CUDA_ARCH_LIST:-default}, ${MAX_JOBS} jobs"
fi

if [[ -n ${WANT[check]:-} ]]; then
  run_step check "$BUILD_LOG" 180 "$PY" "$TMP/check.py" "$( ((SMOKE)) && echo smoke || echo gpu)"
  if ((STEP_RC > 0 && STEP_RC != 124 && STEP_RC != 137)); then
    record check FAIL "$STEP_SECS" "$(grep -m1 -E '^ERROR: |Error' "$BUILD_LOG" | cut -c1-200)"
  else
    verdict check "backends: $(grep -m1 '^usable backends:' "$BUILD_LOG" | cut -d: -f2- | sed 's/^ //')"
  fi
fi

# ------------------------------------------------------------------------------- 2. tests
if [[ -n ${WANT[tests]:-} ]]; then
  if ((SMOKE)); then
    TESTS=(tests/test_cuda.py tests/test_opcheck.py)  # without a GPU the CUDA cases skip
  else
    TESTS=(tests/test_cuda.py tests/test_triton.py::test_gpu tests/test_opcheck.py
           tests/test_project.py::test_cuda_matches_cpu)
  fi
  # shellcheck disable=SC2086  # KSEED_PYTEST_ARGS is word-split on purpose
  run_step tests "$TESTS_LOG" 300 "$PY" -m pytest -q -ra -p no:cacheprovider "${TESTS[@]}" ${KSEED_PYTEST_ARGS:-}
  counts=$(grep -E '^=* *[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran' "$TESTS_LOG" \
           | tail -1 | sed -E 's/^=+ //; s/ =+$//')
  skipped_gpu=$(grep -E '^SKIPPED .*tests/test_(cuda|triton|opcheck|project)\.py' "$TESTS_LOG" | head -1 | cut -c1-100)
  if ((STEP_RC == 0 && !SMOKE)) && [[ -n $skipped_gpu ]]; then
    record tests FAIL "$STEP_SECS" "GPU tests were skipped, e.g. '$skipped_gpu' [$counts]"
  elif ((STEP_RC > 0 && STEP_RC != 124 && STEP_RC != 137)); then
    record tests FAIL "$STEP_SECS" "exit status $STEP_RC [$counts] (see tests.log)"
  else
    verdict tests "$counts"
  fi
fi

# ------------------------------------------------------------------------------- 3. benchmarks
SMOKE_ARG=()
((SMOKE)) && SMOKE_ARG=(--smoke)
APPLY_ARGS=() REBUILD_ARGS=() ZO_ARGS=()
if ((QUICK && !SMOKE)); then
  APPLY_ARGS=(--ks "1,16,1024" --reps 2)
  REBUILD_ARGS=(--k 1024 --reps 1)
  ZO_ARGS=(--steps 5)
fi
# shellcheck disable=SC2206  # the extra arguments are word-split on purpose
APPLY_ARGS+=(${KSEED_APPLY_ARGS:-}) REBUILD_ARGS+=(${KSEED_REBUILD_ARGS:-}) ZO_ARGS+=(${KSEED_ZO_ARGS:-})

# One line per benchmark for the table, read off the table each script prints last.
apply_note() {  # the K = 1024 rows of the fused backends (both noise families: "cuda", "cuda rad"):
                # x the per-seed loop, % of the family's floor
  awk '$2 == "1024" && ($3 == "cuda" || $3 == "triton") && NF == 8 {
         printf "%s%s %s %sx loop, %s of floor", sep, $1, $3, $7, $8; sep = "; " }
       $2 == "1024" && ($3 == "cuda" || $3 == "triton") && $4 == "rad" && NF == 9 {
         printf "%s%s %s rad %sx loop, %s of floor", sep, $1, $3, $8, $9; sep = "; " }' "$1"
}
rebuild_note() {  # per method: seconds, x the per-seed loop, extra peak MB
  awk '/^method +time s/ { on = 1; next } on && $(NF-3) !~ /^[0-9.]+$/ { exit }
       on { m = $1; for (i = 2; i <= NF - 4; i++) m = m " " $i
            printf "%s%s %ss %sx %sMB", sep, m, $(NF-3), $(NF-2), $(NF-1); sep = "; " }' "$1"
}
zo_note() {  # per method: ms per step, x MeZO, peak GiB
  awk '/^method +ms\/step/ { on = 1; next } on && $(NF-3) !~ /^[0-9.]+$/ { exit }
       on { m = $1; for (i = 2; i <= NF - 4; i++) m = m " " $i
            printf "%s%s %sms %sx %sGiB", sep, m, $(NF-3), $(NF-2), $(NF-1); sep = "; " }' "$1"
}

if [[ -n ${WANT[apply]:-} ]]; then
  run_step apply "$APPLY_LOG" 300 "$PY" bench/bench_gpu_apply.py "${SMOKE_ARG[@]}" "${APPLY_ARGS[@]}"
  verdict apply "$(apply_note "$APPLY_LOG")"
fi
if [[ -n ${WANT[rebuild]:-} ]]; then
  run_step rebuild "$REBUILD_LOG" 240 "$PY" bench/bench_gpu_rebuild.py "${SMOKE_ARG[@]}" "${REBUILD_ARGS[@]}"
  verdict rebuild "$(rebuild_note "$REBUILD_LOG")"
fi
if [[ -n ${WANT[zo_step]:-} ]]; then
  run_step zo_step "$ZO_LOG" 240 "$PY" bench/bench_gpu_zo_step.py "${SMOKE_ARG[@]}" "${ZO_ARGS[@]}"
  verdict zo_step "$(zo_note "$ZO_LOG")"
fi

if [[ -n ${WANT[project]:-} ]]; then  # project_seeds vs the fused apply: the K = 256 rows' ratios
  PROJECT_ARGS=()
  ((QUICK && !SMOKE)) && PROJECT_ARGS=(--ks "16,256" --reps 2)
  run_step project "$PROJECT_LOG" 180 "$PY" bench/bench_gpu_project.py "${SMOKE_ARG[@]}" "${PROJECT_ARGS[@]}"
  verdict project "$(awk '$2 == "256" && NF == 8 { printf "%s%s %s %s project/apply %s", sep, $1, $3, $4, $8; sep = "; " }' "$PROJECT_LOG")"
fi

if [[ -n ${WANT[memory]:-} ]]; then
  MEM_ARGS=()
  ((QUICK && !SMOKE)) && MEM_ARGS=(--k 64 --steps 2)
  run_step memory "$MEM_LOG" 240 "$PY" bench/bench_gpu_memory.py "${SMOKE_ARG[@]}" "${MEM_ARGS[@]}"
  verdict memory "$(grep -E '^(rebuild|[0-9]+ ZO)' "$MEM_LOG" | sed -E 's/ +/ /g' | paste -sd';' | cut -c1-200) (extra MiB, s)"
fi

# ------------------------------------------------------------------------------- 4. ncu
if [[ -n ${WANT[ncu]:-} ]]; then
  NCU_BIN=$(command -v ncu)
  for cand in /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu; do
    [[ -z $NCU_BIN && -x $cand ]] && NCU_BIN=$cand
  done
  if [[ -z $NCU_BIN ]]; then
    echo "ncu (Nsight Compute) not found" | tee -a "$NCU_LOG"
    record ncu FAIL 0 "ncu (Nsight Compute) not found"
  else
    # shellcheck disable=SC2206  # KSEED_NCU_ARGS is word-split on purpose
    NCU_ARGS=(${KSEED_NCU_ARGS:---set full --clock-control none})
    run_step ncu "$NCU_LOG" 240 "$NCU_BIN" --profile-from-start off --kernel-name regex:apply \
      "${NCU_ARGS[@]}" --export "${NCU_REP%.ncu-rep}" --force-overwrite "$PY" "$TMP/ncu_apply.py"
    if ((STEP_RC == 0)) && [[ ! -s $NCU_REP ]]; then
      record ncu FAIL "$STEP_SECS" "ncu wrote no report"
    else
      ((STEP_RC == 0)) && "$NCU_BIN" --import "$NCU_REP" --page details >>"$NCU_LOG" 2>&1
      verdict ncu "report ncu_apply.ncu-rep, its details in ncu.log"
    fi
  fi
fi

# ------------------------------------------------------------------------------- summary
FINISHED=1
write_summary
echo
echo "== kseed GPU check, logs in $OUTDIR"
table
nf=$(n_failed)
if ((nf == 0)); then
  echo "overall: PASS (${#NAMES[@]} steps, $(elapsed) s)"
  exit 0
fi
echo "overall: FAIL ($nf of ${#NAMES[@]} steps, $(elapsed) s)"
exit 1
