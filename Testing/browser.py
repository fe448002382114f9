"""Browser tests' helpers: Debian's chromium driven by Playwright, and web servers run as subprocesses.

Playwright's own browser download cannot be used here (no network at test time), so Playwright drives
the ``chromium`` package of the distribution (``Testing/run_tests.sh`` installs it with apt-get when
missing). Under ``CI=true`` a missing browser or Playwright fails the test; elsewhere it is skipped with
the reason, like a missing shared file (see ``conftest.py``).

:func:`web_server` starts a server command (``universalseg review ...`` or a test app), waits for the
address it prints (``http://...``) and stops it at the end: SIGINT first (a clean shutdown), then kill.
"""
from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pytest

from conftest import REPO_ROOT, _in_ci

#: Where Debian's chromium package puts the browser; CHROMIUM overrides it.
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
#: Headless in a container as root without a GPU, and no calls home: without the background-networking
#: flags chromium keeps retrying its update and sync services on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
#: Seconds a server has to print its address (a review server imports VTK and Slicer's MRML first).
START_TIMEOUT_S = 120
#: Seconds a server has to stop after SIGINT before it is killed.
STOP_TIMEOUT_S = 15
_ADDRESS = re.compile(r"https?://\S+")


def _missing(message: str) -> None:
    if _in_ci():
        pytest.fail(f"{message} (CI=true: the browser tests must run; Testing/run_tests.sh installs chromium)")
    pytest.skip(message)


def require_browser() -> str:
    """The chromium executable, after checking that it and Playwright are present (fail in CI, skip elsewhere)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("Playwright is not installed (pip install -c constraints-ci.txt -e '.[test]')")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _missing(f"chromium not found at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)")
    return CHROMIUM


def launch_chromium(playwright):
    """A headless chromium (Debian's) with a fresh, empty profile."""
    return playwright.chromium.launch(executable_path=require_browser(), headless=True, args=CHROMIUM_ARGS)


@pytest.fixture(scope="module")
def chromium():
    """A headless chromium for the tests of one module (Playwright's sync API); each test opens its own
    context (cookies, storage) with ``chromium.new_context()``."""
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            yield browser
        finally:
            browser.close()


class ServerProcess:
    """A running server subprocess: its address, and everything it printed so far (for error messages)."""

    def __init__(self, process: subprocess.Popen, lines: "queue.Queue[Optional[str]]") -> None:
        self.process = process
        self._lines = lines
        self.output: list = []
        self.address: Optional[str] = None

    def wait_for_address(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:  # the server's output ended: it exited
                self.process.wait(timeout=STOP_TIMEOUT_S)
                raise AssertionError(f"the server exited (code {self.process.returncode}) before printing its "
                                     f"address; its output:\n{self.text()}")
            self.output.append(line)
            match = _ADDRESS.search(line)
            if match:
                self.address = match.group(0).rstrip(".,;")
                return self.address
        raise AssertionError(f"the server printed no address within {timeout:.0f} s; its output:\n{self.text()}")

    def text(self) -> str:
        """Everything the server printed until now."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.output.append(line)
        return "".join(self.output)

    def stop(self) -> int:
        """SIGINT, then kill if it does not end in time; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextmanager
def web_server(command: Sequence[str], timeout: float = START_TIMEOUT_S, env: Optional[dict] = None,
               cwd: Optional[Path] = None) -> Iterator[ServerProcess]:
    """Run ``command``, wait for the address it prints, yield the :class:`ServerProcess`, stop it at the end."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=environment, cwd=str(cwd or REPO_ROOT))
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    server = ServerProcess(process, lines)
    try:
        server.wait_for_address(timeout)
        yield server
    finally:
        server.stop()


def review_command(*args: str) -> list:
    """The command line of ``universalseg review ARGS`` with the test environment's Python."""
    return [sys.executable, "-m", "UniversalSegLib.cli", "review", *args]


def minimal_app_command(*args: str) -> list:
    """The command line of the minimal trame page behind the access policy (``Testing/minimal_trame_app.py``)."""
    return [sys.executable, str(REPO_ROOT / "Testing" / "minimal_trame_app.py"), *args]
