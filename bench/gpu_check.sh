#!/usr/bin/env bash
# GPU check for a lent H100 machine (issue 2, section 5), run from the repository root:
#
#     bash bench/gpu_check.sh            # logs and results under $OUT (default ./gpu_out)
#
# Builds the extension with CUDA kernels against the machine's own torch, runs the CUDA tests and
# the kernel microbenchmark. The whole script stays within TOTAL_S (8 minutes): every step runs
# under `timeout` with at most what is left of the budget, a failed step does not stop the later
# ones, and $OUT/summary.txt records each step's status. Override PYTHON to pick the interpreter.
set -euo pipefail

OUT="${OUT:-./gpu_out}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
TOTAL_S="${TOTAL_S:-480}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
exec > >(tee "$OUT/gpu_check.log") 2>&1  # the whole run's output, besides the per-step logs
START=$SECONDS
FAILED=0

remaining() { echo $((TOTAL_S - (SECONDS - START))); }

# step NAME CAP RESERVE CMD...: run CMD (a command or an exported function) with a timeout of
# min(CAP, what is left - RESERVE), RESERVE being the seconds kept for the steps after it. Output
# goes to stdout and $OUT/NAME.log; the step's limit is in $STEP_LIMIT for CMD.
step() {
  local name="$1" cap="$2" reserve="$3"
  shift 3
  local limit=$(($(remaining) - reserve))
  ((limit > cap)) && limit=$cap
  if ((limit < 5)); then
    echo "$name: SKIPPED (budget spent)" | tee -a "$SUMMARY"
    return 0
  fi
  echo "=== $name (timeout ${limit}s): $*"
  local t0=$SECONDS rc
  set +e
  STEP_LIMIT=$limit timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 |
    tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  local status="ok"
  if ((rc == 124 || rc == 137)); then
    status="TIMEOUT after ${limit}s"
  elif ((rc != 0)); then
    status="FAILED (rc=$rc)"
  fi
  [[ $status == ok ]] || FAILED=$((FAILED + 1))
  echo "$name: $status ($((SECONDS - t0))s)" | tee -a "$SUMMARY"
}

versions() {
  nvidia-smi || echo "nvidia-smi failed"
  "$PYTHON" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
EOF
  nvcc --version || echo "nvcc not on PATH (CUDA_HOME=${CUDA_HOME:-unset})"
}

# Build tools: install only what is missing; the machine may have no network, so a failed install
# is reported and the build tried anyway.
build_deps() {
  local missing=()
  for mod in ninja pybind11 pytest; do
    "$PYTHON" -c "import $mod" 2>/dev/null || missing+=("$mod")
  done
  if ((${#missing[@]} == 0)); then
    echo "ninja, pybind11 and pytest already installed"
    return 0
  fi
  echo "installing: ${missing[*]}"
  "$PYTHON" -m pip install --retries 0 --timeout 10 "${missing[@]}" ||
    echo "WARNING: could not install ${missing[*]} (no network?); continuing"
}

# --no-deps: the runtime dependencies are not needed for the kernels, and may not be installable.
# Falls back to an in-place build (ninja reuses the objects already compiled) if pip itself fails.
build() {
  export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 CLASP_BUILD_CUDA=1
  "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . || {
    echo "WARNING: pip install -e . failed; trying setup.py build_ext --inplace"
    "$PYTHON" setup.py build_ext --inplace
  }
}

# torch.compile of the references is the slow part: stop starting compiles 100 s before the
# step's limit so the remaining cases still get their clasp and eager timings.
bench() {
  local budget=$((STEP_LIMIT - 100))
  ((budget < 0)) && budget=0
  "$PYTHON" bench/bench_ops.py --device cuda --out "$OUT/ops_cuda.json" --time-budget "$budget"
}

# Issue 4's GPU part: per-step costs of a LLaMA-3-8B-shaped model (random bf16 weights) and the
# speedup they imply for the tau measured on the real models on CPU (a projection).
step_costs() {
  "$PYTHON" bench/bench_step_costs.py --random-shape llama3-8b --device cuda --context 512 \
    --records bench/results/e2e-*/records.json --out "$OUT/steps"
}

# Named copies of the table for bench/results/ (e.g. ops_nvidia_h100_80gb_hbm3.md).
copy_results() {
  [[ -f "$OUT/ops_cuda.json" ]] || { echo "no $OUT/ops_cuda.json: the bench wrote nothing"; return 1; }
  local name
  name="$("$PYTHON" -c 'import json, re, sys
env = json.load(open(sys.argv[1]))["environment"]
print(re.sub(r"[^a-z0-9]+", "_", env["device_name"].lower()).strip("_"))' "$OUT/ops_cuda.json")"
  cp "$OUT/ops_cuda.json" "$OUT/ops_$name.json"
  cp "$OUT/ops_cuda.md" "$OUT/ops_$name.md"
  cat "$OUT/ops_cuda.md"
}

# The machine's Python may be marked externally managed (PEP 668); this is a throwaway machine.
export PIP_BREAK_SYSTEM_PACKAGES=1
export -f versions build_deps build bench step_costs copy_results
export PYTHON OUT

#    name          cap reserve (seconds kept for later steps)
step versions 30 400 versions
step build_deps 60 380 build_deps
step build 240 200 build
step info 30 180 "$PYTHON" -m clasp_ext.info
step tests 150 130 "$PYTHON" -m pytest tests -q -x -k "not slow"
step bench 600 100 bench
step copy_results 10 90 copy_results
step step_costs 90 0 step_costs

echo "total $((SECONDS - START))s, $FAILED step(s) not ok" | tee -a "$SUMMARY"
cat "$SUMMARY"
((FAILED == 0))
