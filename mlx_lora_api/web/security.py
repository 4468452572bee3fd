"""Who may call the API: an optional API key, and no cross-site requests from browsers.

A page on any web site can make the browser post to http://127.0.0.1:8000, so a local API
needs more than a loopback bind:
- `Origin`: browsers send it on cross-origin requests; only the service's own origin (and
  configured extra origins) pass. No CORS headers are ever sent, so browsers keep the answers
  of other origins' requests from their pages.
- `Host`: against DNS rebinding, a loopback-bound service answers only to loopback names.
- `Content-Type`: a state-changing request must say `application/json` when it has a body;
  browsers can send form and text bodies cross-site without a CORS preflight, not JSON. The one
  exception is OpenAI's upload, `POST /v1/files`, which is `multipart/form-data` by its
  definition: there a browser's request must come from the service's own page (`Origin`, as
  above, and `Sec-Fetch-Site`, which browsers set on every request and pages cannot).
- `Authorization: Bearer KEY` where a key is configured, compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

import msgspec

from .bodies import ErrorBody

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
OPEN_PATHS = {"/health", "/"}  # and the dashboard's files: the page and its code hold no data
OPEN_PREFIXES = ("/dashboard/",)
FORM_PATHS = {"/v1/files"}  # multipart/form-data by OpenAI's definition
_encode = msgspec.json.Encoder().encode


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_host(value: str) -> tuple[str, str]:
    parsed = urlsplit(f"//{value}")
    return (parsed.hostname or "").lower(), str(parsed.port or "")


class Guard:
    """ASGI middleware; refuses with the service's usual error body."""

    def __init__(self, app, api_key: str | None, bind_host: str, allowed_origins: list[str] | None = None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.check_host = is_loopback(bind_host)
        self.allowed_origins = {o.rstrip("/").lower() for o in allowed_origins or []}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self.refusal(scope)
        if problem is None:
            return await self.app(scope, receive, send)
        status, message = problem
        headers = [(b"content-type", b"application/json")]
        if status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="mlx-lora-api"'))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": _encode(ErrorBody(message))})

    def refusal(self, scope) -> tuple[int, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host_header = headers.get("host", "")
        host, _ = _split_host(host_header)
        if self.check_host and host and host not in LOOPBACK_NAMES and not is_loopback(host):
            return 403, f"the Host header {host_header!r} is not a loopback name; this service only answers to them"
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, host_header):
            return 403, f"requests from the web origin {origin!r} are not allowed"
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            declares_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
            form = content_type == "multipart/form-data" and scope["path"] in FORM_PATHS
            if form and headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                return 403, "uploads from other web sites are not allowed"
            if declares_body and content_type != "application/json" and not form:
                return 415, "send the request body as JSON, with `Content-Type: application/json`"
        open_path = scope["path"] in OPEN_PATHS or scope["path"].startswith(OPEN_PREFIXES)
        if self.api_key and not open_path:
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key):
                return 401, "missing or wrong API key: send `Authorization: Bearer <key>`"
        return None

    def _origin_allowed(self, origin: str, host_header: str) -> bool:
        origin = origin.rstrip("/").lower()
        if origin in self.allowed_origins:
            return True
        parsed = urlsplit(origin)
        return parsed.scheme in ("http", "https") and parsed.netloc == host_header.lower()
