"""The review app's safety rules (UniversalSeg/UniversalSegWeb: access.py, folders.py, locks.py).

Access: a real trame server (``Testing/minimal_trame_app.py``) behind :class:`AccessPolicy` is asked for
its page and its websocket with no token, a wrong token and the right one, by an HTTP client and by
chromium. Folders: paths that leave the allowed folders by ``..`` or a link are refused; uploads that are
too large, badly named or not a CT are refused and leave nothing behind. Locks: two processes compete for
one case; the loser is told who holds it and since when; a dead holder's lock is taken over.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from browser import chromium, minimal_app_command, web_server  # noqa: F401  (chromium is a fixture)
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "UniversalSeg"))

from UniversalSegLib.errors import AccessDenied, CaseLocked, InputNotFoundError, UploadRejected, UsageError  # noqa: E402
from UniversalSegWeb import locks as locks_module  # noqa: E402
from UniversalSegWeb.access import REFUSED_TEXT, AccessPolicy, is_loopback  # noqa: E402
from UniversalSegWeb.folders import AllowedFolders  # noqa: E402
from UniversalSegWeb.locks import CaseLock, lock_path, read_holder  # noqa: E402

PAGE_TEXT = "UniversalSeg access test page"  # what Testing/minimal_trame_app.py shows


def small_ct_bytes(tmp_path: Path) -> bytes:
    """A small valid CT (soft tissue in air, in HU) as NIfTI bytes."""
    array = np.full((24, 20, 8), -1000, np.int16)
    array[5:19, 4:16, :] = 40
    path = tmp_path / "source.nii.gz"
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.5, 1.0])), path)
    return path.read_bytes()


def everything_under(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------- access
def test_policy_requires_a_token_off_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")

    local = AccessPolicy("127.0.0.1")
    assert not local.requires_token and local.token is None
    assert local.url("127.0.0.1", 8080) == "http://127.0.0.1:8080/"

    public = AccessPolicy("0.0.0.0")
    assert public.requires_token and len(public.token) >= 40
    assert public.url("10.1.2.3", 8080) == f"http://10.1.2.3:8080/?token={public.token}"
    assert public.url("0.0.0.0", 80).startswith(f"http://{socket.gethostname()}:80/?token=")
    assert public.allows(public.token) and not public.allows(public.token[:-1]) and not public.allows(None)
    assert AccessPolicy("0.0.0.0").token != public.token  # generated afresh

    given = AccessPolicy("::1", token="s3cret")
    assert given.requires_token and given.url("::1", 9) == "http://[::1]:9/?token=s3cret"
    with pytest.raises(UsageError, match="empty"):
        AccessPolicy("0.0.0.0", token=" ")


async def _http(url: str, headers=None, cookies=None):
    import aiohttp

    async with aiohttp.ClientSession(cookies=cookies) as session:
        async with session.get(url, headers=headers or {}, allow_redirects=False) as response:
            return response.status, await response.text(), dict(response.headers), response.cookies


async def _websocket(url: str, headers=None) -> int:
    """The status of a websocket upgrade on ``url`` (101 when it opened)."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url, headers=headers or {}, timeout=aiohttp.ClientWSTimeout(ws_close=5)):
                return 101
        except aiohttp.WSServerHandshakeError as error:
            return error.status


@pytest.fixture(scope="module")
def token_server():
    with web_server(minimal_app_command("--host", "127.0.0.1", "--token", "right-token"), timeout=60) as server:
        yield server


def test_wrong_token_refused_on_page_and_websocket(token_server):
    address = token_server.address
    assert address.endswith("/?token=right-token")
    base = address.split("?")[0]
    ws = base.replace("http://", "ws://") + "ws"
    for url in (base, base + "index.html", base + "?token=wrong", base + "index.html?token=right-token-"):
        status, text, _, _ = asyncio.run(_http(url))
        assert (status, text) == (403, REFUSED_TEXT), url
    assert asyncio.run(_http(base + "index.html", headers={"Authorization": "token wrong"}))[0] == 403
    assert asyncio.run(_websocket(ws)) == 403
    assert asyncio.run(_websocket(ws + "?token=wrong")) == 403
    assert asyncio.run(_websocket(ws, headers={"Cookie": "universalseg-token-0=right-token"})) == 403

    # The right token: in the address (then a cookie is set), in the cookie, in an Authorization header.
    status, text, headers, cookies = asyncio.run(_http(base + "index.html?token=right-token"))
    assert status == 200 and "<html" in text.lower()
    (name, morsel), = cookies.items()
    assert morsel.value == "right-token" and morsel["httponly"] and morsel["samesite"] == "Strict"
    assert asyncio.run(_http(base + "index.html", cookies={name: "right-token"}))[0] == 200
    assert asyncio.run(_http(base + "index.html", headers={"Authorization": "token right-token"}))[0] == 200
    assert asyncio.run(_websocket(ws + "?token=right-token")) == 101
    assert asyncio.run(_websocket(ws, headers={"Cookie": f"{name}=right-token"})) == 101


def test_loopback_server_without_token_refuses_foreign_pages():
    with web_server(minimal_app_command("--host", "127.0.0.1"), timeout=60) as server:
        address = server.address
        assert "token" not in address
        ws = address.replace("http://", "ws://") + "ws"
        port = address.rsplit(":", 1)[1].strip("/")
        assert asyncio.run(_http(address + "index.html"))[0] == 200
        assert asyncio.run(_websocket(ws, headers={"Origin": address.rstrip("/")})) == 101  # its own page
        # Another site's script in the user's browser, another local server's page, a sandboxed frame or a
        # local file (Origin: null), and a DNS-rebound name, are refused.
        assert asyncio.run(_websocket(ws, headers={"Origin": "http://evil.example"})) == 403
        assert asyncio.run(_websocket(ws, headers={"Origin": f"http://127.0.0.1:{int(port) + 1}"})) == 403
        assert asyncio.run(_websocket(ws, headers={"Origin": "null"})) == 403
        status, text, _, _ = asyncio.run(_http(address + "index.html", headers={"Host": f"evil.example:{port}"}))
        assert status == 403 and "evil.example" in text


def test_token_page_in_chromium(token_server, chromium):  # noqa: F811
    base = token_server.address.split("?")[0]
    context = chromium.new_context()
    try:
        page = context.new_page()
        refused = page.goto(base + "?token=wrong")
        assert refused.status == 403 and "needs its access token" in page.content()

        opened = page.goto(token_server.address)
        assert opened.status == 200
        # The text arrives as trame state through the websocket: seeing it means the websocket was let in.
        page.wait_for_selector(f"text={PAGE_TEXT}", timeout=30_000)
        # Later visits without the token in the address carry the cookie.
        assert page.goto(base).status == 200
        page.wait_for_selector(f"text={PAGE_TEXT}", timeout=30_000)
    finally:
        context.close()
    fresh = chromium.new_context()  # another browser profile: no cookie
    try:
        assert fresh.new_page().goto(base).status == 403
    finally:
        fresh.close()


# ------------------------------------------------------------------------------------------ folders
@pytest.fixture
def tree(tmp_path):
    """allowed/ (with a CT, a DICOM folder, a batch folder, results, a hidden file and links) and outside/."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "cases" / "dicom_series").mkdir(parents=True)
    (allowed / "batch_out").mkdir()
    outside.mkdir()
    (allowed / "cases" / "ct.nii.gz").write_bytes(small_ct_bytes(tmp_path))
    (allowed / "cases" / "ct.seg.nrrd").write_bytes(b"x")
    (allowed / "cases" / "ct_labels.nii.gz").write_bytes(b"x")
    (allowed / "cases" / "notes.txt").write_text("x")
    (allowed / "cases" / ".hidden").write_text("x")
    (allowed / "cases" / "dicom_series" / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (allowed / "batch_out" / "review_queue.csv").write_text("rank,case\n")
    (outside / "secret.nii.gz").write_bytes(b"x")
    (allowed / "cases" / "escape").symlink_to(outside, target_is_directory=True)
    (allowed / "cases" / "escape.nii.gz").symlink_to(outside / "secret.nii.gz")
    (allowed / "cases" / "inside.nii.gz").symlink_to(allowed / "cases" / "ct.nii.gz")
    return allowed, outside


def test_paths_outside_the_allowed_folders_are_refused(tree):
    allowed, outside = tree
    folders = AllowedFolders([allowed])
    assert folders.resolve("cases/ct.nii.gz") == allowed.resolve() / "cases" / "ct.nii.gz"
    assert folders.resolve(allowed / "cases" / ".." / "cases" / "inside.nii.gz").name == "ct.nii.gz"
    for path in ("../outside/secret.nii.gz", "cases/../../outside/secret.nii.gz", str(outside / "secret.nii.gz"),
                 "cases/escape/secret.nii.gz", "cases/escape", "cases/escape.nii.gz", "/etc/passwd", "..", "/"):
        with pytest.raises(AccessDenied, match="outside the folders this review server may open"):
            folders.resolve(path)
        assert not folders.contains(path)
    with pytest.raises(AccessDenied):
        folders.resolve("cases/\x00ct.nii.gz")
    with pytest.raises(InputNotFoundError):
        folders.resolve("cases/missing.nii.gz")
    with pytest.raises(AccessDenied):
        folders.list("cases/escape")
    with pytest.raises(InputNotFoundError, match="does not exist"):
        AllowedFolders([allowed / "nowhere"])
    with pytest.raises(UsageError, match="not a folder"):
        AllowedFolders([allowed / "cases" / "notes.txt"])
    # A second root is allowed too; the first one stays the base of relative paths.
    both = AllowedFolders([allowed, outside])
    assert both.resolve(outside / "secret.nii.gz").parent == outside.resolve()
    assert both.resolve("cases").parent == allowed.resolve()


def test_listing_classifies_entries(tree):
    allowed, _ = tree
    folders = AllowedFolders([allowed])
    (root,) = folders.list()
    assert (root.name, root.kind) == ("allowed", "folder")
    assert {e.name: e.kind for e in folders.list(".")} == {"batch_out": "batch", "cases": "folder"}
    kinds = {e.name: e.kind for e in folders.list("cases")}
    assert kinds == {"dicom_series": "dicom", "ct.nii.gz": "ct", "inside.nii.gz": "ct", "ct.seg.nrrd": "other",
                     "ct_labels.nii.gz": "other", "notes.txt": "other"}  # no hidden file, no link leading out
    assert [e.name for e in folders.list("cases")][0] == "dicom_series"  # folders first
    assert folders.entry("cases/ct.nii.gz").size == (allowed / "cases" / "ct.nii.gz").stat().st_size


def test_uploads_are_checked_and_never_overwrite(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    folders = AllowedFolders([root])
    ct = small_ct_bytes(tmp_path)

    def refused(name, data, match, max_bytes=10**6):
        with pytest.raises(UploadRejected, match=match):
            folders.save_upload(name, data, max_bytes)
        assert everything_under(root) == [], "a refused upload left something behind"

    refused("big.nii.gz", ct, "more than the", max_bytes=len(ct) - 1)
    refused("empty.nii.gz", b"", "empty")
    refused("broken.nii.gz", b"not a gzip file" * 50, r"not a readable NIfTI.*broken\.nii\.gz")
    refused("truncated.nii.gz", ct[: len(ct) // 2], "broken|truncated|not a readable|cannot|damaged|ends")
    refused("ct.exe", ct, "upload a CT as one")
    refused("slice.dcm", ct, "DICOM series")
    refused("header.nhdr", ct, "upload a CT as one")
    array = np.full((8, 8, 8), 40, np.int16)
    raw = tmp_path / "elsewhere.raw"
    array.tofile(raw)
    detached = (b"NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 8\nencoding: raw\nendian: little\n"
                b"space directions: (1,0,0) (0,1,0) (0,0,1)\nspace: left-posterior-superior\n"
                b"data file: " + str(raw).encode() + b"\n\n")
    refused("detached.nrrd", detached, "separate data file")
    refused("detached.mha", b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_SHORT\n"
            b"ElementDataFile = " + str(raw).encode() + b"\n", "separate data file")
    white_noise = (tmp_path / "noise.nii.gz")
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), np.eye(4)), white_noise)
    refused("noise.nii.gz", white_noise.read_bytes(), "HU|Hounsfield|CT")

    first = folders.save_upload("../../My scan (1).nii.gz", ct, 10**6)
    assert first == root.resolve() / "uploads" / "My_scan_1.nii.gz" and first.read_bytes() == ct
    again = folders.save_upload("My scan (1).nii.gz", ct, 10**6)
    assert again.name == "My_scan_1-1.nii.gz" and first.read_bytes() == ct
    assert folders.save_upload(".nii.gz", ct, 10**6).name == "upload.nii.gz"
    assert sorted(p.name for p in (root / "uploads").iterdir()) == ["My_scan_1-1.nii.gz", "My_scan_1.nii.gz",
                                                                    "upload.nii.gz"]
    refused_later = len(everything_under(root))
    with pytest.raises(UploadRejected):
        folders.save_upload("broken.nii.gz", b"junk" * 100, 10**6)
    assert len(everything_under(root)) == refused_later  # no temporary left in uploads/


def test_upload_folder_leading_outside_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "uploads").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AccessDenied, match="leads outside"):
        AllowedFolders([root]).save_upload("ct.nii.gz", small_ct_bytes(tmp_path), 10**6)
    assert list(outside.iterdir()) == []


# -------------------------------------------------------------------------------------------- locks
_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {web!r})
    from UniversalSegWeb.locks import CaseLock
    lock = CaseLock.acquire({folder!r}, "case_007", "Annotator Ann")
    print("locked", flush=True)
    time.sleep(60)
""")


def test_lock_contention_between_processes_names_the_holder(tmp_path):
    code = _HOLD_LOCK.format(web=str(REPO_ROOT / "UniversalSeg"), folder=str(tmp_path))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CaseLocked) as caught:
            CaseLock.acquire(tmp_path, "case_007", "Bob")
        message = str(caught.value)
        assert "Annotator Ann" in message and socket.gethostname() in message and str(holder.pid) in message
        assert "since 20" in message and "UTC" in message
        assert caught.value.holder["holder"] == "Annotator Ann" and caught.value.exit_code == 5
        assert read_holder(tmp_path, "case_007")["pid"] == holder.pid
        # Another case is free.
        CaseLock.acquire(tmp_path, "case_008", "Bob").release()
    finally:
        holder.kill()  # SIGKILL: the lock file stays, its process is gone
        holder.wait()
    assert lock_path(tmp_path, "case_007").exists()
    assert read_holder(tmp_path, "case_007") is None  # same machine, dead process: stale
    with CaseLock.acquire(tmp_path, "case_007", "Bob") as taken:
        assert read_holder(tmp_path, "case_007")["holder"] == "Bob" and taken.owns()
    assert not lock_path(tmp_path, "case_007").exists()


def test_stale_heartbeat_is_taken_over_and_only_the_owner_releases(tmp_path, monkeypatch):
    path = lock_path(tmp_path, "c1")
    now = time.time()
    record = {"holder": "Carol", "host": "another-machine", "pid": 1, "started": now - 3600, "heartbeat": now - 30,
              "id": "abc"}
    path.write_text(json.dumps(record))
    with pytest.raises(CaseLocked, match="Carol .*another-machine"):  # other machine, recent heartbeat: held
        CaseLock.acquire(tmp_path, "c1", "Dan")
    record["heartbeat"] = now - locks_module.STALE_AFTER_S - 1
    path.write_text(json.dumps(record))
    dan = CaseLock.acquire(tmp_path, "c1", "Dan")  # heartbeat too old: taken over
    assert dan.owns() and read_holder(tmp_path, "c1")["holder"] == "Dan"

    before = dan.record["heartbeat"]
    time.sleep(0.01)
    dan.refresh()
    assert json.loads(path.read_text())["heartbeat"] > before

    # Dan's process stalls past the stale age; Erin takes the case over. Dan's release leaves Erin's lock.
    monkeypatch.setattr(locks_module, "_now", lambda: time.time() + locks_module.STALE_AFTER_S + 5)
    erin = CaseLock.acquire(tmp_path, "c1", "Erin")
    monkeypatch.undo()
    with pytest.raises(CaseLocked, match="lost.*Erin"):
        dan.refresh()
    dan.release()
    assert read_holder(tmp_path, "c1")["holder"] == "Erin"
    erin.release()
    assert not path.exists() and list(tmp_path.iterdir()) == []

    with pytest.raises(UsageError):
        CaseLock.acquire(tmp_path, "../c1", "Eve")


def test_keep_alive_refreshes_until_released(tmp_path):
    lock = CaseLock.acquire(tmp_path, "c2", "Fay")
    first = lock.record["heartbeat"]
    lock.keep_alive(interval_s=0.05)
    deadline = time.time() + 5
    while json.loads(lock.path.read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.02)
    assert json.loads(lock.path.read_text())["heartbeat"] > first
    lock.release()
    assert not lock.path.exists()
    assert not any(name.startswith(".~") for name in os.listdir(tmp_path))


# ------------------------------------------------------------------------- the review app in chromium
def test_review_app_refuses_wrong_token_and_paths_outside(tmp_path, chromium):  # noqa: F811
    """``universalseg review`` itself: a wrong token gets the refusal page; a page that asks (through its
    own controls, or tampered with) for a path outside the allowed folders gets an error and no file."""
    from browser import review_command

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    ct = small_ct_bytes(tmp_path)
    (allowed / "ct.nii.gz").write_bytes(ct)
    (outside / "secret.nii.gz").write_bytes(ct)
    (allowed / "link.nii.gz").symlink_to(outside / "secret.nii.gz")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "UniversalSeg"), os.environ.get("PYTHONPATH")]))}
    command = review_command(str(allowed), "--token", "review-token", "--device", "cpu")
    with web_server(command, env=env, cwd=tmp_path) as server:
        assert server.address.endswith("?token=review-token")
        base = server.address.split("?")[0]
        context = chromium.new_context(viewport={"width": 1400, "height": 900})
        try:
            page = context.new_page()
            assert page.goto(base + "?token=wrong").status == 403
            assert "needs its access token" in page.content()

            assert page.goto(server.address).status == 200
            page.get_by_test_id("entry-ct.nii.gz").wait_for(timeout=60_000)
            assert page.get_by_test_id("entry-link.nii.gz").count() == 0  # a link leading out is not listed

            def refused(what: str) -> None:
                error = page.get_by_test_id("error")
                error.wait_for(timeout=30_000)
                text = error.inner_text()
                assert "outside the folders this review server may open" in text, (what, text)
                page.evaluate("window.trame.state.set('us_error', '')")
                error.wait_for(state="detached", timeout=10_000)

            # A tampered page: entries the server never listed, leading out by '..', a link, an absolute path.
            for name, path in (("dotdot", "../outside/secret.nii.gz"), ("link", "link.nii.gz"),
                               ("absolute", str(outside / "secret.nii.gz"))):
                page.evaluate("entry => window.trame.state.set('us_entries', [entry])",
                              {"name": name, "path": path, "kind": "ct", "icon": "mdi-file", "label": "CT"})
                page.get_by_test_id(f"entry-{name}").click()
                refused(path)
            # The page's own export-folder field, pointed outside: opening a case (which locks it there) is refused.
            page.evaluate("window.trame.state.set('us_entries', [])")
            page.evaluate("window.trame.state.set('us_folder', '.')")
            page.get_by_test_id("export-folder").locator("input").fill("../outside")
            page.get_by_test_id("folder-up").click()
            page.get_by_test_id("entry-ct.nii.gz").click()
            refused("export folder ../outside")
        finally:
            context.close()
    assert sorted(p.name for p in outside.iterdir()) == ["secret.nii.gz"]


def test_review_command_refuses_bad_options_with_a_sentence(tmp_path, capsys):
    """Bad --port, --max-upload-mb, --host, a port in use and a missing folder: one line, usage exit code,
    before any server starts."""
    pytest.importorskip("trame_slicer")
    from UniversalSegLib.cli import main
    from UniversalSegLib.errors import UsageError

    def refused(*argv) -> str:
        assert main(["review", str(tmp_path), *argv]) == UsageError.exit_code
        return capsys.readouterr().err

    assert "--port must be between 1 and 65535" in refused("--port", "99999")
    assert "--max-upload-mb must be a positive number" in refused("--max-upload-mb", "0")
    assert "Cannot listen on --host 192.0.2.1" in refused("--host", "192.0.2.1")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert f"Port {busy.getsockname()[1]} is in use" in refused("--port", str(busy.getsockname()[1]))
    assert main(["review", str(tmp_path / "missing")]) != 0
    assert "does not exist" in capsys.readouterr().err
