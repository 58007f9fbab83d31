#!/usr/bin/env bash
# Set everything up and run the whole test suite: bash tools/test.sh [pytest args]
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
# The browser tests drive Debian's Chromium (never a downloaded browser).
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser tests will be skipped"
fi
install_labengine test
export MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" -m pytest -p no:cacheprovider --nbval-lax --nbval-current-env tests labs solutions "$@"
