#!/usr/bin/env bash
# The test command of the README: creates .venv if needed, installs the project with the exact versions of
# constraints-ci.txt (torch pinned: an unpinned torch can pull a multi-GB build), runs pytest on Testing/.
# Extra arguments go to pytest (e.g. -k taxonomy).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${UNIVERSALSEG_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints-ci.txt -e ".[test]"
exec "$venv/bin/python" -m pytest "$@"
