#!/usr/bin/env bash
# Creates .venv with the pinned requirements (runtime; --test: runtime + test) and the project. Idempotent and quick when nothing changed.
# Usage: scripts/setup.sh [--test]   (--test also installs Debian's chromium and docker-compose for the browser/compose tests)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)' \
  || { echo "Python 3.11 is required (found $("$PYTHON" --version 2>&1))" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
# Two pinned sets (scripts/compile_requirements.sh): requirements.txt (runtime: the demo) and
# requirements-dev.txt (runtime + test tools: --test). The stamp names the set installed and the
# hash of its inputs; the dev set includes every runtime pin, so it also serves the demo.
stamp=.venv/.requirements.sha
runtime="runtime $(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
dev="dev $(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
have=$(cat "$stamp" 2>/dev/null || true)
if [ "${1:-}" = "--test" ]; then
  want=$dev; requirements=requirements-dev.txt
else
  want=$runtime; requirements=requirements.txt
  [ "$have" = "$dev" ] && want=$dev
fi
if [ "$have" != "$want" ]; then
  echo "==> installing pinned $requirements (a few minutes on a fresh machine)"
  log=.venv/pip-install.log
  { .venv/bin/python -m pip install --upgrade pip \
      && .venv/bin/python -m pip install -r "$requirements" \
      && .venv/bin/python -m pip install --no-deps -e . ; } >"$log" 2>&1 \
    || { tail -n 40 "$log" >&2; echo "pip install failed; full log: $log" >&2; exit 1; }
  # setuptools leaves an egg-info beside the packages; Airflow would then load the plugin twice
  rm -rf include/*.egg-info
  echo "$want" > "$stamp"
fi

if [ "${1:-}" = "--test" ]; then
  missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium chromium-driver)
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "==> installing Debian packages: ${missing[*]}"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      echo "warning: ${missing[*]} missing and not root; the browser/compose tests will say so" >&2
    fi
  fi
fi
