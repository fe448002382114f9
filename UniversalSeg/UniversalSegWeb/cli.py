"""Body of ``universalseg review [FOLDER ...]``: start the review page and print its address.

The subcommand's arguments are declared in :mod:`UniversalSegLib.cli` (which imports this module only
when ``review`` runs, so the library works without the ``web`` extra). Safe defaults: it listens on
127.0.0.1; on any other address it requires an access token (generated and printed unless ``--token``
gives one); the page opens and writes files only inside the given folders (default: the current one).
Ctrl-C stops it cleanly: the open case's lock is released and the worker process is stopped.
"""
from __future__ import annotations

import argparse
import errno
import socket
import sys
from pathlib import Path

__all__ = ["run_review", "free_port"]


def free_port(host: str, port: int = 0) -> int:
    """``port`` if nobody listens on it now, or (``port`` 0) a free one; the server binds it right after,
    and it is printed so it can be opened. Raises ``OSError`` (address not of this computer, port in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, port))
        return int(probe.getsockname()[1])


def run_review(args: argparse.Namespace) -> int:
    """Start the server (blocking until Ctrl-C or SIGTERM); returns the exit code."""
    from trame.app import get_server

    from UniversalSegLib.errors import UsageError

    from .access import AccessPolicy
    from .app import ReviewApp
    from .folders import AllowedFolders

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535 (or 0 for a free one), got {args.port}.")
    if not args.max_upload_mb > 0:
        raise UsageError(f"--max-upload-mb must be a positive number of megabytes, got {args.max_upload_mb:g}.")
    folders = AllowedFolders([Path(p).expanduser() for p in (list(args.folders or []) + list(args.allow or []))
                              or [Path.cwd()]])
    policy = AccessPolicy(args.host, args.token)
    try:
        port = free_port(args.host, args.port)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise UsageError(f"Port {args.port} is in use on {args.host}; choose another --port, or leave it "
                             "out to take a free one.") from None
        # an address this computer does not have, or a name that does not resolve
        raise UsageError(f"Cannot listen on --host {args.host}: {error.strerror or error}. Use an address of "
                         "this computer (127.0.0.1 for this computer only, 0.0.0.0 for every network).") from None
    server = get_server(f"universalseg-review-{port}", client_type="vue3")
    app = ReviewApp(server, folders, model=args.model, device=args.device, runtime=args.runtime,
                    max_upload_bytes=int(args.max_upload_mb * 2**20))
    policy.install(server)
    address = policy.url(args.host, port)
    roots = ", ".join(str(root) for root in folders.roots)
    server.controller.on_server_ready.add(lambda **_: print(
        f"UniversalSeg review: open {address}\n  folders: {roots}\n  Ctrl-C to stop.", flush=True))
    saved_argv = sys.argv
    sys.argv = sys.argv[:1]  # trame also parses the command line: it must not see review's own arguments
    try:
        server.start(port=port, host=args.host, open_browser=False, show_connection_info=False, timeout=0,
                     backend="aiohttp")
    except KeyboardInterrupt:
        pass
    finally:
        sys.argv = saved_argv
        app.close()  # releases the case lock and stops the worker, also when the server itself failed
    print("UniversalSeg review stopped.", flush=True)
    return 0
