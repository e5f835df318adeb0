#!/usr/bin/env bash
# GPU check for a lent GPU machine (issue 2 section 5, issue 8 item 5), run from the repository
# root:
#
#     bash bench/gpu_check.sh            # logs and results under $OUT (default ./gpu_out)
#
# The machine's image (H200: Python 3.12, torch 2.11.0+cu130, transformers 5.17) has no package
# registry, so nothing is installed: pip is never asked for a package (PIP_NO_INDEX=1), the deps
# step reports what is missing, and the build needs only torch, setuptools and a CUDA toolkit
# (ninja if present; without it the sources still compile MAX_JOBS at a time, see build_inplace).
#
# Steps: build the extension with the CUDA kernels against the machine's torch; whether an op's
# input error reaches Python (error_path); the CUDA op tests (every test taking `device`, CUDA
# parameter; the input-check tests in their own interpreter); the decoder on CUDA
# (tests/test_decoding_cuda.py: greedy equals model.generate, sampling, DP on CUDA = DP on CPU,
# batches, CUDA-graph rounds equal eager ones); CUDA graphs against eager rounds and
# model.generate (bench/bench_cuda_graphs.py); the packed
# grouped-query attention against transformers' sdpa (bench/bench_attention.py); per-step costs of
# a LLaMA-3-8B-shaped model; the kernel microbenchmark. The whole script stays within TOTAL_S
# (470 s: under 8 minutes even if the last step needs its 10 s kill grace): every step runs under
# `timeout` with at most what is left of the budget, a failed step does not stop the later ones,
# and $OUT/summary.txt records each step's status, time and notes.
#
# Without a GPU (bench/emulate_gpu_image.sh proves the script on an emulated image) the CUDA tests
# are collected and skipped, the decoder tests run on the CPU (CLASP_CUDA_TESTS_ON_CPU=1), and the
# benchmarks run small CPU stand-ins, so every step still exercises its code.
#
# Settings (environment): PYTHON (interpreter; default python), OUT, TOTAL_S, MAX_JOBS (parallel
# compiles; default nproc), TORCH_CUDA_ARCH_LIST (default: the GPU's, else 9.0), CUDA_HOME
# (default: found), TIME_SCALE (integer; multiplies every cap, reserve and TOTAL_S, for slow
# machines such as the emulation's two shared cores).
#
# Budget on the H200 (16 cores), seconds as the first H200 run measured them (2026-12-04,
# bench/results/gpu-check-nvidia-h200/summary.txt) or estimated: versions and deps 14; build 55
# (ninja, 16 jobs; cap 240 for a machine without ninja); info and the error probes ~12; CUDA op
# tests ~60 (estimated: that run crashed at 20 s); decoder tests 132 (cost tables calibrated on
# first use per setup); CUDA graphs ~80 (random 1B init, B = 1, 4, 8 fixed and B = 1, 4 cost,
# 4 runs x 3 modes of 64 tokens per row; estimated); step costs ~40 (26 before the low-bit draft
# steps); packed attention ~25 (9 shapes; 18 did not fit in 40 s); the toolchain check only after
# a crash (~70); the kernel microbenchmark what is left (~50; it ran complete in 65 s, all
# references, once). Each step's reserve is what the steps after it need at those times, so a
# slow step squeezes the last ones first.
set -euo pipefail

OUT="${OUT:-./gpu_out}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
TIME_SCALE="${TIME_SCALE:-1}"
TOTAL_S="${TOTAL_S:-$((470 * TIME_SCALE))}"
MAX_JOBS="${MAX_JOBS:-$(nproc)}"
CUDA_MARK="cuda and not slow"  # tests/test_gpu_check.py checks what this selects
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
exec > >(tee "$OUT/gpu_check.log") 2>&1  # the whole run's output, besides the per-step logs
START=$SECONDS
FAILED=0

# No registry and no hub on the machine: never let pip or transformers wait on the network.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The machine's Python may be marked externally managed (PEP 668); this is a throwaway machine.
export PIP_BREAK_SYSTEM_PACKAGES=1

remaining() { echo $((TOTAL_S - (SECONDS - START))); }

# step NAME CAP RESERVE CMD...: run CMD (a command or an exported function) with a timeout of
# min(CAP, what is left - RESERVE), CAP and RESERVE scaled by TIME_SCALE, RESERVE being the seconds
# kept for the steps after it. Output goes to stdout and $OUT/NAME.log; CMD finds its limit in
# $STEP_LIMIT and may add notes for the summary line with `note TEXT`.
step() {
  local name="$1" cap=$(($2 * TIME_SCALE)) reserve=$(($3 * TIME_SCALE))
  shift 3
  local limit=$(($(remaining) - reserve))
  ((limit > cap)) && limit=$cap
  if ((limit < 5)); then
    echo "$name: SKIPPED (budget spent)" | tee -a "$SUMMARY"
    return 0
  fi
  echo "=== $name (timeout ${limit}s, $(remaining)s left): $*"
  local t0=$SECONDS rc
  rm -f "$OUT/$name.note"
  set +e
  STEP_NAME=$name STEP_LIMIT=$limit timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 |
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
  local notes=""
  [[ -s $OUT/$name.note ]] && notes=" [$(paste -sd ';' "$OUT/$name.note" | sed 's/;/; /g')]"
  echo "$name: $status ($((SECONDS - t0))s)$notes" | tee -a "$SUMMARY"
}

skip() { echo "$1: SKIPPED ($2)" | tee -a "$SUMMARY"; }
note() { echo "$*" >>"$OUT/$STEP_NAME.note"; }
# exit_status RC: "rc=RC", with the signal where a signal ended the process (RC > 128)
exit_status() { echo "rc=$1$( (($1 > 128)) && echo " (signal $(($1 - 128)))")"; }

# --- what the machine has (cheap probes, in the main shell: the steps depend on them) ---------
read -r HAS_GPU GPU_ARCH GPU_NAME TORCH_IS_CUDA <<<"$(timeout 90 "$PYTHON" -c '
import torch
ok = torch.cuda.is_available()
cap = "%d.%d" % torch.cuda.get_device_capability(0) if ok else "-"
name = torch.cuda.get_device_name(0).replace(" ", "_") if ok else "-"
print(int(ok), cap, name, int(torch.version.cuda is not None))
' 2>/dev/null || echo "0 - - 0")"

# A CUDA toolkit: CUDA_HOME, CUDA_PATH, /usr/local/cuda, nvcc on PATH, /usr/local/cuda-*, pip's
# nvidia-cuda-nvcc; the first with bin/nvcc and include/cuda_runtime.h. (torch guesses
# dirname(dirname(which nvcc)), which is wrong where nvcc on PATH is a wrapper script.)
find_cuda_home() {
  local c nvcc site
  local candidates=("${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda)
  if nvcc="$(command -v nvcc)"; then candidates+=("$(dirname "$(dirname "$(readlink -f "$nvcc")")")"); fi
  candidates+=(/usr/local/cuda-*)
  if site="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)"; then
    candidates+=("$site"/nvidia/cu1* "$site"/nvidia/cuda_nvcc)
  fi
  for c in "${candidates[@]}"; do
    if [[ -n $c && -x $c/bin/nvcc && -f $c/include/cuda_runtime.h ]]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}
if CUDA_HOME="$(find_cuda_home)" && ((TORCH_IS_CUDA)); then
  CLASP_BUILD_CUDA=1
else
  CUDA_HOME="${CUDA_HOME:-}"
  CLASP_BUILD_CUDA=0
fi
if ((HAS_GPU)); then
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$GPU_ARCH}"
else
  TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
fi
echo "gpu: $GPU_NAME (sm $GPU_ARCH) | torch is a CUDA build: $TORCH_IS_CUDA |" \
  "CUDA_HOME=${CUDA_HOME:-none} | CLASP_BUILD_CUDA=$CLASP_BUILD_CUDA |" \
  "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST | MAX_JOBS=$MAX_JOBS | TOTAL_S=$TOTAL_S" | tee -a "$SUMMARY"

# --- steps ----------------------------------------------------------------------------------------
versions() {
  nvidia-smi || echo "nvidia-smi failed"
  "$PYTHON" - <<'EOF'
import platform, sys
import torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
try:
    import transformers
    print("transformers", transformers.__version__)
except ImportError as err:
    print("transformers missing:", err)
EOF
  if [[ -n $CUDA_HOME ]]; then "$CUDA_HOME/bin/nvcc" --version; else echo "no CUDA toolkit found"; fi
  c++ --version | head -1 || echo "no c++ compiler"
  echo "cores $(nproc), $(free -g | awk '/Mem:/ {print $2}') GiB memory"
}

# What the steps need, and what each missing piece costs. Nothing is installed (no registry).
deps() {
  "$PYTHON" - <<'EOF'
import importlib, os, shutil, sys
from torch.utils.cpp_extension import is_ninja_available

missing = []
for mod, why in [
    ("setuptools", "the build"),
    ("pytest", "the test steps"),
    ("transformers", "the decoder tests and the step costs"),
    ("numpy", "nothing required (torch warns without it)"),
]:
    try:
        m = importlib.import_module(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}")
    except ImportError:
        print(f"MISSING {mod}: needed by {why}")
        missing.append(mod)
cxx = os.environ.get("CXX") or "c++"
if shutil.which(cxx):
    print(f"C++ compiler: {shutil.which(cxx)}")
else:
    print(f"MISSING C++ compiler {cxx!r}: nothing can be built")
    missing.append("c++")
if is_ninja_available():
    print("ninja: found (torch's BuildExtension compiles with it)")
else:
    print("ninja: not found; the build compiles MAX_JOBS sources at a time without it")
print("pybind11: not needed (torch ships its headers)")
sys.exit(1 if set(missing) & {"setuptools", "pytest", "transformers", "c++"} else 0)
EOF
}

# setup.py build_ext --inplace (objects stay in build/, so a rerun on a warm machine recompiles
# only what changed). Without ninja, torch's BuildExtension falls back to setuptools' compiler,
# which compiles one source at a time (416 CPU-seconds for this extension: over the budget);
# here its compile() runs MAX_JOBS sources at a time in forked children (forked, not threads:
# torch swaps the compiler executable around each .cu source).
build_inplace() {
  "$PYTHON" - build_ext --inplace <<'EOF'
import os, runpy, sys, traceback
from torch.utils import cpp_extension

jobs = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
build_extensions = cpp_extension.BuildExtension.build_extensions


def compile_forked(self, sources, output_dir=None, macros=None, include_dirs=None, debug=False,
                   extra_preargs=None, extra_postargs=None, depends=None):
    """distutils' CCompiler.compile with each source's _compile in a child process."""
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)
    running, failed = {}, []

    def reap():
        pid, status = os.wait()
        obj = running.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(obj)

    for obj in objects:
        if obj not in build:
            continue
        while len(running) >= jobs:
            reap()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                src, ext = build[obj]
                self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        running[pid] = obj
    while running:
        reap()
    if failed:
        from setuptools.errors import CompileError
        raise CompileError(f"{len(failed)} source(s) failed to compile: {failed}")
    return objects


def patched(self):
    if not self.use_ninja and jobs > 1:
        if hasattr(self.compiler, "_setup_compile") and hasattr(self.compiler, "_get_cc_args"):
            print(f"gpu_check: no ninja; compiling {jobs} sources at a time", flush=True)
            self.compiler.compile = compile_forked.__get__(self.compiler)
        else:
            print("gpu_check: no ninja and an unknown compiler class; compiling serially")
    build_extensions(self)


cpp_extension.BuildExtension.build_extensions = patched
sys.argv = ["setup.py", *sys.argv[1:]]
runpy.run_path("setup.py", run_name="__main__")
EOF
}

build() {
  export CUDA_HOME TORCH_CUDA_ARCH_LIST MAX_JOBS CLASP_BUILD_CUDA
  [[ -n $CUDA_HOME ]] || unset CUDA_HOME
  echo "CUDA_HOME=${CUDA_HOME:-} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS" \
    "CLASP_BUILD_CUDA=$CLASP_BUILD_CUDA"
  if ((CLASP_BUILD_CUDA)); then note "CUDA kernels sm_$TORCH_CUDA_ARCH_LIST"; else note "CPU kernels only"; fi
  note "compiler ${CXX:-c++}: $("${CXX:-c++}" --version | head -1)"
  if "$PYTHON" -c 'import sys; from torch.utils.cpp_extension import is_ninja_available as f; sys.exit(not f())'; then
    note "ninja, $MAX_JOBS jobs"
  else
    note "no ninja: setuptools compiler, $MAX_JOBS forked compiles"
  fi
  if ! build_inplace; then
    echo "WARNING: setup.py build_ext --inplace failed; trying pip install -e . (no index)"
    note "in-place build failed; pip -e fallback"
    "$PYTHON" -m pip install --no-index --no-build-isolation --no-deps -v -e . || return 1
  fi
  "$PYTHON" - <<'EOF' || return 1
import os, sys
import clasp_ext
info = clasp_ext.build_info()
print("built:", info)
if info["with_cuda"] != (os.environ["CLASP_BUILD_CUDA"] == "1"):
    sys.exit(f"with_cuda={info['with_cuda']} but CLASP_BUILD_CUDA={os.environ['CLASP_BUILD_CUDA']}")
EOF
  if ((HAS_GPU && !CLASP_BUILD_CUDA)); then
    echo "FAILED: a GPU but no CUDA kernels (torch CUDA build: $TORCH_IS_CUDA, no toolkit found)"
    return 1
  fi
}

# pytest ARGS...: quiet, failures and errors listed, JUnit XML next to the log; a test module
# that fails to import (a CPU-side breakage) must not keep the others from running.
# PYTEST_XML names the XML (default: the step's name).
run_pytest() {
  "$PYTHON" -m pytest -q -rfE -p no:cacheprovider --durations=10 --continue-on-collection-errors \
    --junitxml="$OUT/${PYTEST_XML:-$STEP_NAME}.xml" "$@"
}

# The kernels on CUDA first: every test taking `device`, CUDA parameter (the CPU ones run in CI).
# --maxfail rather than -x, so one failure does not hide the others.
# The input-check tests (tests/test_ops_errors.py) run last in an interpreter of their own and
# verbosely: on the first H200 run (2026-12-04) their first CUDA case crashed the interpreter
# (SIGSEGV while the op raised), which hid every test after it and the case's name.
tests_cuda_ops() {
  ((HAS_GPU)) || note "no CUDA device: collected and skipped"
  local rc=0
  run_pytest tests -m "$CUDA_MARK" --maxfail=50 --ignore=tests/test_decoding_cuda.py \
    --ignore=tests/test_ops_errors.py || rc=$?
  ((rc == 0)) || note "op tests $(exit_status $rc)"
  local rc_err=0
  PYTEST_XML=${STEP_NAME}_errors PYTHONFAULTHANDLER=1 run_pytest tests/test_ops_errors.py \
    -m "$CUDA_MARK" -vv --maxfail=50 || rc_err=$?  # -vv: run_pytest's -q takes one back
  ((rc_err == 0)) || note "input-check tests $(exit_status $rc_err)"
  ((rc == 0 && rc_err == 0))
}

# Does an op's input check reach Python as a RuntimeError, on the CPU and on CUDA? Each probe runs
# in a fresh interpreter, so a crash is reported with its signal (and marked in $OUT/NAME.crashed).
probe_errors_in() {
  local dir="$1" dev rc status=0
  for dev in cpu $( ((HAS_GPU)) && echo cuda); do
    (cd "$dir" && ulimit -c 0 && "$PYTHON" -c '
import sys, torch, clasp_ext
dev = sys.argv[1]
try:
    clasp_ext.cosine_scores(torch.zeros(2, 4, device=dev), torch.zeros(2, 4, device=dev))
except RuntimeError as e:
    print(f"{dev}: raised RuntimeError:", str(e).splitlines()[0])
    sys.exit(0)
sys.exit(f"{dev}: a rank-2 candidates tensor raised nothing")
' "$dev")
    rc=$?
    if ((rc == 0)); then
      note "$(basename "$dir") $dev: raises"
    else
      note "$(basename "$dir") $dev: $(exit_status $rc)"
      ((rc > 128)) && touch "$OUT/$(basename "$dir").crashed"
      status=1
    fi
  done
  return $status
}

error_path() { probe_errors_in "$PWD"; }  # the build's compiler is in the build step's notes

# Only where a probe crashed (a signal, not an ordinary failure): the same probe against a second
# build made with the system compiler (`c++`, when the build used another one, e.g. the image's
# CXX=/opt/gcc/bin/g++) in a copy of the tree, to tell whether the crash belongs to the toolchain
# or to the code. It runs late (a full build, ~55 s on the H200), before the kernel benchmark.
toolchain_check() {
  local crashed=("$OUT"/*.crashed)
  if [[ ! -e ${crashed[0]} ]]; then
    note "no probe crashed: nothing to check"
    return 0
  fi
  local sys_cxx
  sys_cxx="$(command -v c++ || true)"
  if [[ -z $sys_cxx || "$(readlink -f "$sys_cxx")" == "$(readlink -f "$(command -v "${CXX:-c++}")")" ]]; then
    note "no other compiler to try"
    return 1
  fi
  local alt=/tmp/clasp_alt_build
  rm -rf "$alt" && mkdir -p "$alt"
  # the tree without its build (the machine's copy may have no .git to ask for tracked files)
  tar -cf - --exclude=./build --exclude='*.so' --exclude=./.git --exclude=./gpu_out . |
    tar -xf - -C "$alt"
  local sys_cc
  sys_cc="$(command -v cc || command -v gcc || true)"
  echo "=== second build with $sys_cxx ($("$sys_cxx" --version | head -1)), CC=${sys_cc:-unset}"
  (
    cd "$alt" && export CXX="$sys_cxx" && { [[ -n $sys_cc ]] && export CC="$sys_cc" || unset CC; } &&
      build_inplace >"$OUT/toolchain_build.log" 2>&1
  ) || { note "second build (system c++) failed: toolchain_build.log"; return 1; }
  probe_errors_in "$alt"
  return 1  # the build the other steps used crashes
}

decoding_cuda() {
  if ((HAS_GPU)); then
    run_pytest tests/test_decoding_cuda.py -m "$CUDA_MARK" --maxfail=20
  else
    note "no CUDA device: ran on the CPU (CLASP_CUDA_TESTS_ON_CPU=1)"
    CLASP_CUDA_TESTS_ON_CPU=1 run_pytest tests/test_decoding_cuda.py -m "$CUDA_MARK" --maxfail=20
  fi
}

# Issue 4's GPU part: per-step costs of a LLaMA-3-8B-shaped model (random bf16 weights) and the
# speedup they imply for the tau measured on the real models on CPU (a projection).
step_costs() {
  local records=(bench/results/e2e-*/records.json)
  if ((HAS_GPU)); then
    "$PYTHON" bench/bench_step_costs.py --random-shape llama3-8b --device cuda --context 512 \
      --records "${records[@]}" --out "$OUT/steps"
  else
    note "no CUDA device: tiny-llama on the CPU"
    "$PYTHON" bench/bench_step_costs.py --random-shape tiny-llama --dtype float32 --context 16 \
      --repeats 3 --threads "$MAX_JOBS" --records "${records[@]}" --out "$OUT/steps-cpu-tiny"
  fi
}

# The batched loop replayed from CUDA graphs against the same loop eager (cuda_graphs.py) and
# against model.generate on the same batch: random LLaMA-3.2-1B-shaped bf16 weights (where launch
# overhead weighs most), B = 1, 4, 8 with every round drafting, then B = 1, 4 with the default
# policy.
cuda_graphs() {
  if ((HAS_GPU)); then
    local rc=0
    "$PYTHON" bench/bench_cuda_graphs.py --random-shape llama3.2-1b --device cuda \
      --out "$OUT/cuda_graphs" || rc=$?
    # the default policy, which falls back to plain steps where drafts do not pay: the floor
    # against model.generate (issue 9: >= 0.97x on any machine)
    "$PYTHON" bench/bench_cuda_graphs.py --random-shape llama3.2-1b --device cuda \
      --policy cost --batch-sizes 1 4 --out "$OUT/cuda_graphs_cost" || rc=$?
    return $rc
  else
    note "no CUDA device: tiny-llama on the CPU, static buffers without capture"
    "$PYTHON" bench/bench_cuda_graphs.py --random-shape tiny-llama --dtype float32 --device cpu \
      --batch-sizes 1 3 --new-tokens 16 --repeats 2 --threads "$MAX_JOBS" \
      --out "$OUT/cuda_graphs-cpu-tiny"
  fi
}

# The packed grouped-query sdpa (clasp_ext/decoding/attention.py) against transformers' sdpa, which
# copies K/V per query head under a mask: one ragged forward of random LLaMA-3.2-1B-shaped weights
# (32 query heads on 8 K/V heads), interleaved, at long batch caches.
attention_bench() {
  if ((HAS_GPU)); then
    "$PYTHON" bench/bench_attention.py --random-shape llama3.2-1b --device cuda \
      --batch-sizes 1 8 32 --tokens 1 2 8 --contexts 4096 --repeats 5 --out "$OUT/attention"
  else
    note "no CUDA device: tiny-llama on the CPU"
    "$PYTHON" bench/bench_attention.py --random-shape tiny-llama --dtype float32 \
      --batch-sizes 1 3 --tokens 1 3 --contexts 64 --repeats 2 --threads "$MAX_JOBS" \
      --out "$OUT/attention-cpu-tiny"
  fi
}

# torch.compile of the references is the slow part: stop starting compiles 100 s before the
# step's limit so the remaining cases still get their clasp and eager timings.
bench() {
  if ((HAS_GPU)); then
    local budget=$((STEP_LIMIT - 100))
    ((budget < 0)) && budget=0
    "$PYTHON" bench/bench_ops.py --device cuda --out "$OUT/ops_cuda.json" --time-budget "$budget"
  else
    note "no CUDA device: CPU --quick"
    "$PYTHON" bench/bench_ops.py --device cpu --quick --threads "$MAX_JOBS" \
      --out "$OUT/ops_cpu_quick.json"
  fi
}

# Named copies of the table for bench/results/ (e.g. ops_nvidia_h200.md).
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

export -f versions deps build_inplace build run_pytest tests_cuda_ops probe_errors_in error_path \
  toolchain_check exit_status \
  decoding_cuda cuda_graphs \
  attention_bench step_costs bench copy_results note
export PYTHON OUT MAX_JOBS HAS_GPU CUDA_HOME CLASP_BUILD_CUDA TORCH_CUDA_ARCH_LIST TORCH_IS_CUDA \
  CUDA_MARK

#    name            cap reserve (seconds kept for later steps; both times TIME_SCALE)
step versions         20 430 versions
step deps             20 420 deps
step build           240 220 build
step info             20 200 "$PYTHON" -m clasp_ext.info
step error_path       30 200 error_path
step tests_cuda_ops  120 270 tests_cuda_ops
step decoding_cuda   180 140 decoding_cuda
step cuda_graphs     120  60 cuda_graphs
step step_costs       60  25 step_costs
step attention_bench  40  10 attention_bench
step toolchain_check 100   5 toolchain_check
step bench           600   5 bench
if ((HAS_GPU)); then
  step copy_results   10   0 copy_results
else
  skip copy_results "no CUDA device"
fi

echo "total $((SECONDS - START))s, $FAILED step(s) not ok" | tee -a "$SUMMARY"
cat "$SUMMARY"
((FAILED == 0))
