"""A minimal trame page behind the review server's access policy, for the access tests.

Run as ``python Testing/minimal_trame_app.py [--host H] [--token T]``: it listens on a free port and
prints its address (with ``?token=`` when one is required) the way ``universalseg review`` does. The page
shows a text that reaches the browser through the websocket, so seeing it proves the websocket opened.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "UniversalSeg"))

from trame.app import get_server  # noqa: E402
from trame.ui.html import DivLayout  # noqa: E402
from trame.widgets import html  # noqa: E402

from UniversalSegWeb.access import AccessPolicy  # noqa: E402

#: Text of the page, sent through the websocket as state.
PAGE_TEXT = "UniversalSeg access test page"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token", default=None)
    args = parser.parse_args()
    server = get_server("universalseg-access-test", client_type="vue3")
    server.state.page_text = PAGE_TEXT
    with DivLayout(server):
        html.Div("{{ page_text }}", id="page-text")
    policy = AccessPolicy(args.host, args.token)
    policy.install(server)
    server.controller.on_server_ready.add(lambda **_: print(policy.url(args.host, server.port), flush=True))
    server.start(port=0, host=args.host, open_browser=False, show_connection_info=False, backend="aiohttp",
                 timeout=0)


if __name__ == "__main__":
    main()
