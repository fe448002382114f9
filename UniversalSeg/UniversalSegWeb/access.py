"""Who may talk to a review server: the access token, and the aiohttp middleware that enforces it.

Like Jupyter's: a server that listens only on the loopback interface (127.0.0.1, ::1, localhost) needs no
token unless one is given; a server listening on any other address always needs one (generated and
printed when not given). The token may come as ``?token=...`` in the address (the server then sets a
cookie, so the page's static files and its websocket carry it without the address), as that cookie, or
as an ``Authorization: token ...`` header. Every HTTP request and the websocket upgrade go through the
middleware; a refused request gets 403 and a plain sentence saying what to do.

Without a token (loopback only) the middleware still refuses what a web page elsewhere could make the
browser send: a request whose Origin is not this server's own address (another site's script, another
local server's page, or ``Origin: null`` from a sandboxed frame or a local file) and a Host header that
is not a loopback name (DNS rebinding).

This module imports only the standard library at import time (aiohttp is imported when the middleware
is installed), and parses on Python 3.9.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import socket
from typing import Optional
from urllib.parse import quote, urlsplit

logger = logging.getLogger(__name__)

__all__ = ["AccessPolicy", "generate_token", "is_loopback", "TOKEN_QUERY", "REFUSED_TEXT"]

#: The query parameter that carries the token in the printed address.
TOKEN_QUERY = "token"
#: Names a client may use for the loopback interface.
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
#: Listening on these means every interface; the printed address then uses the machine's name.
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})
#: What a refused request reads (HTTP 403).
REFUSED_TEXT = (
    "403 Forbidden: this UniversalSeg review server needs its access token. Open the address printed when "
    "the server started (it ends with ?token=...), or ask the person who started it for the token."
)
_FOREIGN_TEXT = (
    "403 Forbidden: this UniversalSeg review server listens only for this machine and answers pages opened "
    "from its own address (http://127.0.0.1:<port>/ or http://localhost:<port>/); the request came from {what}. "
    "To reach it through a proxy or another name, start it with an access token (--token)."
)


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or name, IPv6 with or without brackets) is the loopback interface."""
    host = (host or "").strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def generate_token() -> str:
    """A fresh random access token (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def _host_of(host_header: str) -> str:
    """The host name of a ``Host``/``Origin`` value without its port (``[::1]:8080`` -> ``::1``)."""
    if "://" not in host_header:
        host_header = "//" + host_header
    try:
        return urlsplit(host_header).hostname or ""
    except ValueError:
        return ""


def _host_and_port(value: str) -> tuple:
    """``(host name, port)`` of a ``Host`` or ``Origin`` value (the scheme's port when none is written);
    ``("", None)`` for one that names no host, such as ``null``."""
    text = value if "://" in value else "//" + value
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        return "", None
    if port is None:
        port = 443 if parts.scheme in ("https", "wss") else 80
    host = (parts.hostname or "").lower()
    return (host, port) if host else ("", None)


class AccessPolicy:
    """The access rule of one review server.

    Args:
        host: the address the server listens on.
        token: the access token; None generates one when ``host`` is not a loopback address (a server
            reachable from other machines always needs a token) and means "no token" on loopback.
            An empty string is refused: it would look like protection and give none.
    """

    def __init__(self, host: str, token: Optional[str] = None) -> None:
        if token is not None and not token.strip():
            from UniversalSegLib.errors import UsageError

            raise UsageError("The access token is empty; give a non-empty --token, or leave it out to have one generated.")
        self.host = host
        self.loopback_only = is_loopback(host)
        self.token = token if token is not None else (None if self.loopback_only else generate_token())
        self.requires_token = self.token is not None
        # One cookie name per token: browsers share cookies between ports of a host, so two review servers
        # on one machine must not overwrite each other's cookie.
        digest = hashlib.sha256(self.token.encode()).hexdigest()[:12] if self.token else ""
        self.cookie_name = f"universalseg-token-{digest}"

    # ------------------------------------------------------------------------------------------ checks
    def allows(self, token: Optional[str]) -> bool:
        """True when ``token`` opens this server (always True when no token is required); constant time."""
        if not self.requires_token:
            return True
        if not token:
            return False
        return hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self.token.encode("utf-8"))

    def url(self, host: str, port: int) -> str:
        """The address to print: ``http://host:port/``, with ``?token=...`` when a token is required.

        A wildcard host (0.0.0.0, ::) is replaced by this machine's name, which other machines can use.
        """
        if host in _WILDCARD_HOSTS:
            host = socket.gethostname()
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        address = f"http://{host}:{int(port)}/"
        if self.requires_token:
            address += f"?{TOKEN_QUERY}={quote(self.token, safe='')}"
        return address

    def token_of(self, request) -> tuple[Optional[str], bool]:
        """The token a request carries and whether it came in the query (then the cookie is set)."""
        query_token = request.query.get(TOKEN_QUERY)
        if query_token:
            return query_token, True
        authorization = request.headers.get("Authorization", "")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "token" and value.strip():
            return value.strip(), False
        return request.cookies.get(self.cookie_name), False

    def refusal(self, request) -> Optional[str]:
        """Why ``request`` (an aiohttp request) is refused, or None when it may go on."""
        if self.requires_token:
            token, _ = self.token_of(request)
            return None if self.allows(token) else REFUSED_TEXT
        # No token: only this machine, and only pages served by this server, may talk to it.
        if not is_loopback(_host_of(request.host or "")):
            return _FOREIGN_TEXT.format(what=f"the address {request.host!r}")
        # A browser names the page that opened a connection in Origin; only this server's own pages (same
        # host and port as the request's Host) may talk to it. "null" is a sandboxed frame or a local file.
        origin = request.headers.get("Origin")
        if origin is not None and _host_and_port(origin) != _host_and_port(request.host or ""):
            return _FOREIGN_TEXT.format(what=f"a page of {origin}")
        return None

    # --------------------------------------------------------------------------------------- the server
    def middleware(self):
        """The aiohttp middleware that applies this policy to every request (page, files, websocket)."""
        from aiohttp import web

        policy = self

        @web.middleware
        async def universalseg_access(request, handler):
            why = policy.refusal(request)
            if why is not None:
                logger.warning("refused %s %s from %s", request.method, request.path, request.remote)
                return web.Response(status=403, text=why, content_type="text/plain")
            token, from_query = policy.token_of(request)
            try:
                response = await handler(request)
            except web.HTTPException as redirect:  # e.g. the "/" -> "index.html" redirect keeps the cookie
                if from_query and policy.requires_token:
                    policy._set_cookie(redirect, token)
                raise
            if from_query and policy.requires_token and not getattr(response, "prepared", False):
                policy._set_cookie(response, token)
            return response

        return universalseg_access

    def _set_cookie(self, response, token: str) -> None:
        response.set_cookie(self.cookie_name, token, httponly=True, samesite="Strict", path="/")

    def install(self, server) -> None:
        """Apply the policy to a trame server: call before ``server.start(..., backend="aiohttp")``.

        trame hands the wslink web server to ``controller.on_server_bind`` before it starts listening;
        the middleware is added to its aiohttp application there, ahead of every route (websocket and
        static files included).
        """

        def bind(wslink_server) -> None:
            app = getattr(wslink_server, "app", None)
            if app is None or not hasattr(app, "middlewares"):
                raise RuntimeError(
                    "The review server's access control needs trame's aiohttp backend "
                    f"(got {type(wslink_server).__name__}); start it with backend='aiohttp'."
                )
            app.middlewares.insert(0, self.middleware())

        server.controller.on_server_bind.add(bind)
