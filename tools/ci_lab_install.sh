#!/usr/bin/env bash
# CI job: the lab exactly as a learner sets it up (issue 17, item 1).
#
# A fresh virtual environment gets exactly what `bash tools/lab.sh` installs (it runs
# lab.sh --setup-only itself: the `[lab]` extra, no triton), then, from the repo root,
# where our top-level kernels/ folder is importable as `kernels`:
#   1. grades every solutions/*.ipynb with tools/grade.py (each must pass every check),
#   2. starts `python -m labengine.serve --model tinylab` and sends it one completion,
#   3. runs a lesson notebook saved at the repo root (its kernel's cwd is the root).
# Usage: bash tools/ci_lab_install.sh          (LAB_CI_VENV=DIR keeps the venv in DIR)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
unset PYTHONPATH TRITON_INTERPRET PYTHON
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg

WORK="$(mktemp -d)"
SERVER_PID=""
ROOT_NOTEBOOK="$ROOT/ci_lab_notebook_at_root.ipynb"
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -f "$ROOT_NOTEBOOK"
  rm -rf "$WORK"
}
trap cleanup EXIT
VENV="${LAB_CI_VENV:-$WORK/venv}"
step() { echo; echo "== lab CI: $* ($(date -u +%H:%M:%S))"; }

step "a fresh venv with exactly what tools/lab.sh installs"
"${BASE_PYTHON:-python3}" -m venv "$VENV"
VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" bash tools/lab.sh --setup-only
PY="$VENV/bin/python"
"$PY" - <<'EOF'
import importlib.util, sys
spec = importlib.util.find_spec("triton")
if spec is not None:
    sys.exit(f"triton is installed ({spec.origin}): the [lab] install must not bring it")
import labengine
print("no triton; labengine from", labengine.__file__)
EOF

step "grading every solution from the repo root"
for nb in solutions/*.ipynb; do
  "$PY" tools/grade.py "$nb" --timeout 300
done

step "python -m labengine.serve --model tinylab from the repo root"
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$PY" -m labengine.serve --model tinylab --port "$PORT" >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
"$PY" - "$PORT" "$SERVER_PID" "$WORK/serve.log" <<'EOF'
import json, os, sys, time, urllib.request
port, pid, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 180
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if not os.path.exists(f"/proc/{pid}") or time.monotonic() > deadline:
        sys.exit("the server did not come up:\n" + open(log).read()[-4000:])
    time.sleep(0.5)
req = urllib.request.Request(base + "/v1/completions", headers={"Content-Type": "application/json"},
                             data=json.dumps({"model": "tinylab", "prompt": "Once upon a time",
                                              "max_tokens": 8, "temperature": 0}).encode())
with urllib.request.urlopen(req, timeout=60) as r:
    body = json.load(r)
choice = body["choices"][0]
assert body["usage"]["completion_tokens"] == 8 and choice["text"], body
print("completion:", repr(choice["text"]))
EOF
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""

step "a lesson notebook saved at the repo root"
cp labs/01_llm_class.ipynb "$ROOT_NOTEBOOK"
"$PY" -m jupyter nbconvert --to notebook --execute "$ROOT_NOTEBOOK" --output-dir "$WORK" \
  --ExecutePreprocessor.timeout=300
echo
echo "lab CI: the [lab] install grades every solution, serves and runs a notebook from the repo root"
