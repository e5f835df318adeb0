#!/usr/bin/env bash
# Runs bench/gpu_check.sh as the lent GPU machine would, minus the GPU: the image's Python 3.12,
# torch 2.11.0 (+cu130: PyPI's Linux wheel, which imports without a GPU), transformers 5.17.0 and
# pytest, no ninja, no network. Run from anywhere in the repository:
#
#     bash bench/emulate_gpu_image.sh                # summary in $EMU_DIR/out/summary.txt
#     bash bench/emulate_gpu_image.sh --with-ninja   # leave the system's ninja visible
#     bash bench/emulate_gpu_image.sh --keep-build   # keep build/ and the .so of the last run
#                                                    # (a warm machine: only changes recompile)
#
# 1. Creates the image's environment once, in $EMU_VENV (default
#    ~/.cache/clasp_ext/venv-gpu-image-py3.12-torch2.11-tf5.17), and reuses it afterwards: the
#    only step that uses the network. A torch 2.11 CPU build is not on PyPI, hence the CUDA one.
# 2. Copies the working tree as the device tool does (tracked files, and untracked ones git does
#    not ignore) to $EMU_DIR/repo (default /tmp/clasp-gpu-image-emu/repo), so the run neither
#    writes into nor races with the checkout.
# 3. Runs gpu_check.sh there in a network namespace with no network (unshare -n), with pip's
#    configuration files, find-links and extra indexes removed and PIP_NO_INDEX=1; it first shows
#    that pip can fetch nothing, then runs the check with TIME_SCALE (default 3: two shared cores
#    instead of sixteen). Exits with gpu_check.sh's status.
#
# EMU_PYTHON: the Python 3.12 to create the environment with (default pyenv's 3.12.1).
# EMU_NICE: niceness of the run (default 10; the machine is shared).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EMU_PYTHON="${EMU_PYTHON:-/root/.pyenv/versions/3.12.1/bin/python}"
EMU_VENV="${EMU_VENV:-$HOME/.cache/clasp_ext/venv-gpu-image-py3.12-torch2.11-tf5.17}"
EMU_DIR="${EMU_DIR:-/tmp/clasp-gpu-image-emu}"
EMU_NICE="${EMU_NICE:-10}"
TIME_SCALE="${TIME_SCALE:-3}"
PINS=(torch==2.11.0 transformers==5.17.0 pytest)
WANT="python 3.12 torch 2.11.0 transformers 5.17.0"

with_ninja=0
keep_build=0
for arg in "$@"; do
  case "$arg" in
    --with-ninja) with_ninja=1 ;;
    --keep-build) keep_build=1 ;;
    *) echo "usage: $0 [--with-ninja] [--keep-build]" >&2; exit 2 ;;
  esac
done

# --- 1. the environment (idempotent) ---------------------------------------------------------
have_env() {
  [[ -x $EMU_VENV/bin/python ]] && [[ "$("$EMU_VENV/bin/python" -c '
import sys, torch, transformers, pytest
print("python %d.%d" % sys.version_info[:2], "torch", torch.__version__.split("+")[0],
      "transformers", transformers.__version__)' 2>/dev/null)" == "$WANT" ]]
}
if have_env; then
  echo "environment: $EMU_VENV ($WANT)"
else
  echo "creating $EMU_VENV ($WANT; downloads about 4 GB once)"
  rm -rf "$EMU_VENV"
  mkdir -p "$(dirname "$EMU_VENV")"
  "$EMU_PYTHON" -m venv "$EMU_VENV"
  "$EMU_VENV/bin/python" -m pip install -q "${PINS[@]}"
  have_env || { echo "the environment does not have $WANT" >&2; exit 1; }
fi

# --- 2. the tree, as the device tool copies it ------------------------------------------------
repo="$EMU_DIR/repo"
out="$EMU_DIR/out"
stash="$EMU_DIR/stash"
rm -rf "$stash" "$out"
mkdir -p "$stash" "$out"
if ((keep_build)) && [[ -d $repo ]]; then  # ignored build outputs survive, as on a warm machine
  [[ -d $repo/build ]] && mv "$repo/build" "$stash/"
  find "$repo/clasp_ext" -maxdepth 1 -name '_C*.so' -exec mv {} "$stash/" \; 2>/dev/null || true
fi
rm -rf "$repo"
mkdir -p "$repo"
git -C "$ROOT" ls-files -co --exclude-standard -z |
  while IFS= read -r -d '' f; do [[ -f $ROOT/$f ]] && printf '%s\0' "$f"; done |
  tar -C "$ROOT" --null -T - -cf - | tar -C "$repo" -xf -
[[ -d $stash/build ]] && mv "$stash/build" "$repo/"
find "$stash" -maxdepth 1 -name '_C*.so' -exec mv {} "$repo/clasp_ext/" \;
echo "tree: $(git -C "$ROOT" rev-parse --short HEAD) + working-tree changes -> $repo"

# --- 3. the run, without network --------------------------------------------------------------
shim="$EMU_DIR/shim"
rm -rf "$shim"
mkdir -p "$shim"
if ((!with_ninja)); then  # torch finds ninja by running `ninja --version`
  printf '#!/bin/sh\necho "ninja: hidden by emulate_gpu_image.sh" >&2\nexit 127\n' >"$shim/ninja"
  chmod +x "$shim/ninja"
fi
netless=()
if unshare -n true 2>/dev/null; then
  netless=(unshare -n)
else
  echo "WARNING: unshare -n is not permitted here; pip is kept off the network by its settings only"
fi

# pip: no configuration files (they name this machine's mirrors), no find-links, no index, and a
# dead proxy in case anything ignores those.
run_env=(
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT
  PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1
  HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9
  http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9
  PATH="$shim:$EMU_VENV/bin:$PATH" PYTHON="$EMU_VENV/bin/python"
  OUT="$out" TIME_SCALE="$TIME_SCALE" EMU_OUT="$out" EMU_REPO="$repo" EMU_NINJA="$with_ninja"
  EMU_NETLESS="${netless[*]:-none}"
)
"${run_env[@]}" nice -n "$EMU_NICE" "${netless[@]}" bash -c '
set -euo pipefail
cd "$EMU_REPO"
tmp="$(mktemp -d)"
{
  echo "emulated image: $("$PYTHON" -c "import sys, torch, transformers; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"transformers\", transformers.__version__)" 2>/dev/null)"
  echo "network: ${EMU_NETLESS} | ninja visible: ${EMU_NINJA}"
  # pip must not be able to fetch: neither with the settings above nor with an explicit index
  if "$PYTHON" -m pip download --no-deps -d "$tmp" six >/dev/null 2>&1; then
    echo "pip (settings): FETCHED a package; this run proves nothing"; exit 1
  fi
  echo "pip (settings): cannot fetch (ok)"
  if env -u PIP_NO_INDEX timeout 60 "$PYTHON" -m pip download --no-deps --retries 0 --timeout 5 \
      --index-url https://pypi.org/simple -d "$tmp" six >/dev/null 2>&1; then
    echo "pip (explicit --index-url): FETCHED a package; this run proves nothing"; exit 1
  fi
  echo "pip (explicit --index-url https://pypi.org/simple): cannot fetch (ok)"
} | tee "$EMU_OUT/emulation.txt"
rm -rf "$tmp"
bash bench/gpu_check.sh
' && rc=0 || rc=$?
echo "emulation: gpu_check.sh exited $rc; summary: $out/summary.txt"
exit "$rc"
