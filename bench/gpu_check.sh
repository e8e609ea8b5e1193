#!/usr/bin/env bash
# `make gpu-check`: the GPU tier, on a machine with an NVIDIA GPU whose python already holds CUDA
# torch, triton, pytest and pytest-benchmark (the lent device image: no network, no venv).
#   1. build rlhfkern._C with CUDA for $GPU_ARCHES (default 9.0), editable, in place
#   2. python -m rlhfkern info (must report cuda=True and the cuda and triton backends)
#   3. the GPU-relevant tests, every backend on CUDA tensors: test_gae, test_ppo_loss,
#      test_advantages, test_logprob, test_gpu, test_sched_gpu (the engine's hf backend on CUDA),
#      test_sched_gpu_megatron (the megatron trainer on CUDA over NCCL; megatron-core from .gpu_bundle;
#      needs pydantic: .gpu_bundle) (in parallel when pytest-xdist is there)
#   4. the benchmarks on the GPU only -> $RESULTS/<card>.md
#   5. a summary of what ran, passed and failed -> $RESULTS/<card>-check.md (rewritten after
#      each step, so a run cut short still leaves one)
# Tests that need a package this python lacks (verl, trl, openrlhf) are deselected by name and
# listed in the summary. What the image lacks travels as wheels in .gpu_bundle/ (`make gpu-bundle`
# downloads them for CPython 3.12 here); they are installed into a folder of this run's own.
# Environment: GPU_PYTHON (python3), CUDA_HOME (found from nvcc), GPU_ARCHES (9.0: the build's
# TORCH_CUDA_ARCH_LIST; an image's own TORCH_CUDA_ARCH_LIST, e.g. 9.0a, is not inherited),
# MAX_JOBS (16), TEST_WORKERS (8), RESULTS (bench/results), BUILD_TIMEOUT/TEST_TIMEOUT/BENCH_TIMEOUT
# (seconds per step), GPU_CHECK_OUT (a folder to copy the log, the tables and the test report to).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-python3}
RESULTS=${RESULTS:-bench/results}
WORK=$(mktemp -d /tmp/rlhfkern-gpu-check.XXXX)
export PYTHONUNBUFFERED=1

if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  fi
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${GPU_ARCHES:-9.0} MAX_JOBS=${MAX_JOBS:-16}
# 0. the carried wheels (`make gpu-bundle`: what the image lacks) into a folder of our own
if ls .gpu_bundle/*.whl >/dev/null 2>&1; then
  $PY -m pip install --quiet --no-index --no-deps --disable-pip-version-check --target "$WORK/site" .gpu_bundle/*.whl \
    && export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH} || echo "gpu-check: the .gpu_bundle wheels did not install"
fi

CARD=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))") || {
  echo "gpu-check: no CUDA device visible to $PY"; exit 1; }
# the device copy of a working tree may have no .git: RLHFKERN_COMMIT names the commit then
export RLHFKERN_COMMIT=${RLHFKERN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
COMMIT=$RLHFKERN_COMMIT
DIRTY=$(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo " (+ uncommitted changes)")
mkdir -p "$RESULTS"
SUMMARY=$RESULTS/$CARD-check.md
declare -A STEP
STEP_ORDER=(build info tests bench)
for s in "${STEP_ORDER[@]}"; do STEP[$s]="not run"; done

# tests that import a package, by the package
NEEDS_VERL=(
  tests/test_gae.py::test_compat_verl_gae_matches_verl
  tests/test_gae.py::test_compat_verl_masked_whiten_matches_verl
  tests/test_gae.py::test_compat_verl_raises_like_verl
  tests/test_ppo_loss.py::test_reference_matches_verl_policy_loss
  tests/test_ppo_loss.py::test_reference_agg_matches_verl
  tests/test_ppo_loss.py::test_reference_kl_and_value_match_verl
  tests/test_ppo_loss.py::test_compat_verl_policy_losses_match_verl
  tests/test_advantages.py::test_reference_matches_verl
  tests/test_advantages.py::test_compat_verl_matches_verl
  tests/test_logprob.py::test_compat_verl_matches_verl
  tests/test_gae.py::test_compat_verl_gae_multi_turn_matches_verl
  tests/test_ppo_loss.py::test_compat_verl_agg_and_value_loss_every_mode_match_verl
  tests/test_ppo_loss.py::test_compat_verl_kl_penalty_values_and_gradients_match_verl
  tests/test_advantages.py::test_compat_verl_multi_turn_and_trajectories_match_verl
)
NEEDS_OPENRLHF=(
  tests/test_ppo_loss.py::test_compat_openrlhf_policy_loss_matches_openrlhf
  tests/test_ppo_loss.py::test_compat_openrlhf_value_loss_and_kl_match_openrlhf
  tests/test_ppo_loss.py::test_compat_openrlhf_kl_and_icepop_edge_cases_match_openrlhf
  tests/test_logprob.py::test_compat_openrlhf_and_trl_match
)
NEEDS_TRL=(tests/test_logprob.py::test_compat_openrlhf_and_trl_match)
DESELECTED=()
for pkg in verl openrlhf trl; do
  if ! $PY -c "import $pkg" >/dev/null 2>&1; then
    declare -n list="NEEDS_${pkg^^}"
    for t in "${list[@]}"; do DESELECTED+=("$t ($pkg not importable here)"); done
    unset -n list
  fi
done

summary() {
  {
    echo "# GPU check: $CARD"
    echo
    echo "commit $COMMIT$DIRTY, $(date -u +%Y-%m-%dT%H:%MZ), \`make gpu-check\` (bench/gpu_check.sh)"
    echo
    echo '```'
    cat "$WORK/info" 2>/dev/null || echo "(no info)"
    echo '```'
    echo
    echo "| step | result |"
    echo "|---|---|"
    for s in "${STEP_ORDER[@]}"; do echo "| $s | ${STEP[$s]} |"; done
    echo
    if [ -f "$WORK/tests.xml" ]; then
      $PY - "$WORK/tests.xml" <<'EOF'
import collections, sys, xml.etree.ElementTree as ET
counts = collections.OrderedDict()
failed = []
for case in ET.parse(sys.argv[1]).iter("testcase"):
    module = case.get("classname", "").replace(".", "/") + ".py"  # tests.test_gae -> tests/test_gae.py
    c = counts.setdefault(module, collections.Counter())
    bad = case.find("failure") if case.find("failure") is not None else case.find("error")
    if bad is not None:
        c["failed"] += 1
        msg = (bad.get("message") or "").strip().splitlines()
        failed.append(f"{module}::{case.get('name')}: {msg[0][:300] if msg else ''}")
    elif case.find("skipped") is not None:
        c["skipped"] += 1
    else:
        c["passed"] += 1
print("| test module | passed | failed | skipped |")
print("|---|---:|---:|---:|")
for m, c in counts.items():
    print(f"| {m} | {c['passed']} | {c['failed']} | {c['skipped']} |")
print()
if failed:
    print("Failed:\n")
    for f in failed:
        print(f"- `{f}`")
    print()
EOF
    fi
    if [ ${#DESELECTED[@]} -gt 0 ]; then
      echo "Deselected (a package this machine lacks):"
      echo
      for t in "${DESELECTED[@]}"; do echo "- \`$t\`"; done
      echo
    fi
    [ -f "$RESULTS/$CARD.md" ] && echo "Benchmarks: [$CARD.md]($CARD.md)"
  } > "$SUMMARY"
}

finish() {
  summary
  if [ -n "${GPU_CHECK_OUT:-}" ]; then
    mkdir -p "$GPU_CHECK_OUT"
    cp "$SUMMARY" "$GPU_CHECK_OUT/" 2>/dev/null
    cp "$RESULTS/$CARD.md" "$GPU_CHECK_OUT/" 2>/dev/null
    cp "$WORK/tests.xml" "$GPU_CHECK_OUT/tests.xml" 2>/dev/null
  fi
  echo "gpu-check: summary in $SUMMARY"
  cat "$SUMMARY"
}
trap finish EXIT

run_step() {  # name timeout command...: runs, records "passed (Ns)" / "failed (rc R, Ns)"
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== gpu-check: $name ($*)"
  timeout "$limit" "$@"
  rc=$?
  if [ $rc -eq 0 ]; then STEP[$name]="passed ($((SECONDS - t0)) s)"
  elif [ $rc -eq 124 ]; then STEP[$name]="timed out after $limit s"
  else STEP[$name]="failed (rc $rc, $((SECONDS - t0)) s)"; fi
  summary
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null
echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

# 1. build: the editable install compiles rlhfkern._C in place (csrc/cpu + csrc/cuda)
run_step build "${BUILD_TIMEOUT:-240}" $PY -m pip install --no-build-isolation --no-deps --no-index \
  --disable-pip-version-check -e . || exit 1

# 2. info
$PY -m rlhfkern info | tee "$WORK/info"
if grep -q "cuda=True" "$WORK/info" && grep -q "backend cuda   runs" "$WORK/info" \
   && grep -q "backend triton runs on cuda" "$WORK/info"; then
  STEP[info]="passed: built with CUDA, cuda and triton backends run on CUDA tensors"
else
  STEP[info]="failed: the CUDA build or a GPU backend is missing (see above)"
fi
summary

# 3. tests
TEST_ARGS=(-p no:cacheprovider -q -rfE --junitxml="$WORK/tests.xml")
$PY -c "import xdist" >/dev/null 2>&1 && TEST_ARGS+=(-n "${TEST_WORKERS:-8}")
$PY -c "import pytest_timeout" >/dev/null 2>&1 && TEST_ARGS+=(--timeout 180)
for t in "${DESELECTED[@]}"; do TEST_ARGS+=(--deselect "${t%% (*}"); done
run_step tests "${TEST_TIMEOUT:-200}" $PY -m pytest tests/test_gae.py tests/test_ppo_loss.py tests/test_advantages.py \
  tests/test_logprob.py tests/test_gpu.py tests/test_sched_gpu.py tests/test_sched_gpu_megatron.py "${TEST_ARGS[@]}"

# 4. benchmarks, GPU rows only (the CPU rows are bench/results/cpu-*.md)
export RLHFKERN_BENCH_DEVICES=cuda
run_step bench "${BENCH_TIMEOUT:-240}" $PY -m pytest bench/bench_gae.py \
  bench/bench_ppo_loss.py bench/bench_logprob.py bench/bench_advantages.py -q -p no:cacheprovider \
  --bench-md "$RESULTS/$CARD.md"
