#!/usr/bin/env bash
# Set everything up and open the lab on the embedded model: bash tools/lab.sh [jupyter lab args]
# bash tools/lab.sh --setup-only   sets up (the same install) and exits without opening JupyterLab.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
install_labengine lab
# The notebooks ask for the `python3` kernel, which Jupyter resolves to the python that runs it
# (this environment's), so no kernelspec is installed. An older launcher installed a user-wide
# `labengine` kernelspec: remove it when it points at this environment, so the lab shows one kernel.
"$PY" - <<'EOF' || true
import os, sys
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
try:
    spec = KernelSpecManager().get_kernel_spec("labengine")
except NoSuchKernel:
    sys.exit(0)
if spec.argv and os.path.realpath(spec.argv[0]) == os.path.realpath(sys.executable):
    KernelSpecManager().remove_kernel_spec("labengine")
    print("removed the old 'labengine' kernelspec (the lab uses this environment's python3 kernel)")
EOF
if [ "${1:-}" = "--setup-only" ]; then
  echo "labengine lab is set up in $("$PY" -c 'import sys; print(sys.prefix)'); open it with: bash tools/lab.sh (or make lab)"
  exit 0
fi
extra=()
[ "$(id -u)" = "0" ] && extra+=(--allow-root)  # Jupyter refuses root unless told
exec "$PY" -m jupyter lab --notebook-dir="$ROOT" "${extra[@]}" "labs/01_llm_class.ipynb" "$@"
