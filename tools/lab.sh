#!/usr/bin/env bash
# Set everything up and open the lab on the embedded model: bash tools/lab.sh
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
install_labengine lab
"$PY" -m ipykernel install --user --name labengine --display-name "labengine" >/dev/null 2>&1 || true
extra=()
[ "$(id -u)" = "0" ] && extra+=(--allow-root)  # Jupyter refuses root unless told
exec "$PY" -m jupyter lab --notebook-dir="$ROOT" "${extra[@]}" "labs/01_llm_class.ipynb" "$@"
