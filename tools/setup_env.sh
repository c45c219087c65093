#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment: `make install`.
#
# Idempotent: a stamp inside the venv records a hash of every file that decides
# what gets installed; when it matches, nothing is done. The slow step is the
# source build of mmcv 2.1.0 with its compiled ops (about 10 minutes on 2 cores);
# pip caches the wheel it builds, so later installs on the same machine are fast.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.expand_mm_stamp"

say() { printf '[install] %s\n' "$*"; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

want="$(cat "$root/requirements.txt" "$root/pyproject.toml" "$root/tools/setup_env.sh" \
        "$root/tools/build/cc-std20" | sha256sum | cut -d' ' -f1)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  say "environment $venv is up to date (delete $stamp to force a reinstall)"
  exit 0
fi

command -v "$python" >/dev/null || die "no '$python' on PATH; install Python 3.11 or pass PYTHON=..."
command -v gcc >/dev/null || die "gcc not found: mmcv's ops are compiled from source. Install it (Debian: apt-get install build-essential)."
command -v g++ >/dev/null || die "g++ not found: mmcv's ops are C++. Install it (Debian: apt-get install g++)."
inc="$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
[[ -f "$inc/Python.h" ]] || die "Python headers missing ($inc/Python.h); install them (Debian: apt-get install python3-dev)."

if [[ ! -x "$venv/bin/python" ]]; then
  say "creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
req() { grep -E "^$1([=<>~ ]|$)" "$root/requirements.txt" | head -n1; }

say "step 1/4: build tools and torch (pip takes torch/torchvision from the local disk)"
"${pip[@]}" install -q --upgrade "pip>=24"
"${pip[@]}" install -q "$(req setuptools)" wheel ninja "$(req numpy)" "$(req torch)" "$(req torchvision)"

if "$venv/bin/python" -c 'import mmcv, mmcv.ops, sys; sys.exit(mmcv.__version__ != "2.1.0")' 2>/dev/null; then
  say "step 2/4: mmcv 2.1.0 with ops already installed"
else
  say "step 2/4: building $(req mmcv) from source WITH its compiled ops."
  say "          This is the long step: ~77 compile units, about 10 minutes on 2 cores."
  say "          (pip caches the wheel; later installs on this machine take seconds.)"
  # torch 2.14's headers need C++20; mmcv's setup.py forces C++17, so the wrapper
  # rewrites the flag. --no-build-isolation makes the build see the installed torch.
  CC="$root/tools/build/cc-std20" CXX="$root/tools/build/cxx-std20" \
  MMCV_WITH_OPS=1 MAX_JOBS="$(nproc)" \
    "${pip[@]}" install --no-build-isolation -v "$(req mmcv)" 2>&1 \
    | grep --line-buffered -E '^\[[0-9]+/[0-9]+\]|Successfully|error|Error|Using cached|Building wheel|Stored in' \
    || true
  "$venv/bin/python" -c 'import mmcv.ops' \
    || die "mmcv built but 'import mmcv.ops' fails; rerun with output: see tools/setup_env.sh step 2"
fi

say "step 3/4: OpenMMLab stack and the rest of requirements.txt"
"${pip[@]}" install -q -r "$root/requirements.txt"

say "step 4/4: expand_mm itself (editable)"
"${pip[@]}" install -q --no-deps --no-build-isolation -e "$root"

"$venv/bin/python" - <<'PY'
import torch, mmcv, mmengine, mmdet, mmseg
from mmcv.ops import nms  # noqa: F401  (fails if the ops were not compiled)
import expand_mm  # noqa: F401
print(f"[install] OK: torch {torch.__version__}, mmengine {mmengine.__version__}, "
      f"mmcv {mmcv.__version__} (ops), mmdet {mmdet.__version__}, mmseg {mmseg.__version__}")
PY
echo "$want" > "$stamp"
