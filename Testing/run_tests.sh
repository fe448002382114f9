#!/usr/bin/env bash
# The test command of the README: creates .venv if needed, installs the project with the exact versions of
# constraints-ci.txt (torch pinned: an unpinned torch can pull a multi-GB build) together with the training
# package, and runs pytest on Testing/.
# Extra arguments go to pytest (e.g. -k taxonomy).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${UNIVERSALSEG_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
echo "installing the project and its test dependencies into $venv (log: $venv/pip-install.log)"
if ! "$venv/bin/python" -m pip install --disable-pip-version-check -c constraints-ci.txt -e ".[test]" -e ./training \
        > "$venv/pip-install.log" 2>&1; then
    tail -n 40 "$venv/pip-install.log"
    echo "pip install failed; full log: $venv/pip-install.log" >&2
    exit 1
fi
exec "$venv/bin/python" -m pytest "$@"
