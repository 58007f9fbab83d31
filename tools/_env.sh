# Shared by tools/lab.sh and tools/test.sh: pick (or make) the Python environment and install.
# Uses the active virtual environment if there is one, else makes .venv in the repo.
# LABENGINE_NO_VENV=1 installs into the current Python instead.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${VIRTUAL_ENV:-}" ] || [ "${LABENGINE_NO_VENV:-0}" = "1" ]; then
  PY="${PYTHON:-python3}"
else
  if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
  fi
  PY="$ROOT/.venv/bin/python"
fi
export PY
install_labengine() {  # $1 = extras, e.g. "lab" or "test"
  "$PY" -m pip install -q --upgrade pip >/dev/null
  # torch first: the package only asks for a range; without a GPU take the CPU build
  # (on these machines torch==2.13.0 is the CPU build, installed from local disk).
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
      "$PY" -m pip install -q "torch>=2.4"
    else
      "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.4" --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  "$PY" -m pip install -q -e ".[$1]"
}
