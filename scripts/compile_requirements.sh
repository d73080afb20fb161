#!/usr/bin/env bash
# Regenerates the two pinned dependency sets from pyproject.toml:
#   requirements.txt      runtime: the project's dependencies + the `deploy` extra (what the image
#                         and the demo install)
#   requirements-dev.txt  runtime + the `test` extra (the test suite, CI); compiled with
#                         requirements.txt as a constraint, so every shared package has the same pin
# uv keeps the versions already in an output file where they still fit (add --upgrade or
# --upgrade-package NAME to move them). Run it after changing the dependencies in pyproject.toml:
#   bash scripts/compile_requirements.sh [extra uv options, e.g. --upgrade-package requests]
set -euo pipefail
cd "$(dirname "$0")/.."

UV=${UV:-.venv/bin/uv}   # uv is pinned in requirements-dev.txt (scripts/setup.sh --test installs it)
# Resolved for the image's platform (Linux, Python 3.11) whichever machine runs this.
common=(--python-version 3.11 --python-platform x86_64-unknown-linux-gnu --quiet
        --custom-compile-command "bash scripts/compile_requirements.sh")

"$UV" pip compile pyproject.toml --extra deploy "${common[@]}" -o requirements.txt "$@"
"$UV" pip compile pyproject.toml --extra deploy --extra test -c requirements.txt "${common[@]}" \
  -o requirements-dev.txt "$@"
