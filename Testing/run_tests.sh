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
# The browser tests drive the distribution's chromium with Playwright (Playwright's own browser download is
# not used). Install it when missing and possible (root with apt-get, as in CI); otherwise those tests skip
# with the reason, or fail under CI=true.
chromium="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$chromium" ] && ! command -v chromium > /dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get > /dev/null; then
        echo "installing Debian's chromium for the browser tests (log: $venv/apt-chromium.log)"
        if ! { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; } \
                > "$venv/apt-chromium.log" 2>&1; then
            tail -n 40 "$venv/apt-chromium.log"
            echo "installing chromium with apt-get failed; full log: $venv/apt-chromium.log" >&2
            exit 1
        fi
    else
        echo "note: chromium is not installed (apt-get install chromium, or set CHROMIUM); the browser tests will skip" \
             "(or fail under CI=true)" >&2
    fi
fi
exec "$venv/bin/python" -m pytest "$@"
