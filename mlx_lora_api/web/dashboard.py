"""The dashboard at `/`: static files shipped in the package (web/dashboard/), no build step and no
CDN, served with a Content-Security-Policy that allows only the service's own scripts and styles.
The page reads everything from the public API; nothing here has data of its own."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

FOLDER = Path(__file__).parent / "dashboard"
POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
    " frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HEADERS = {"Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


async def page(request: Request) -> Response:
    return FileResponse(FOLDER / "index.html", headers=HEADERS)


def assets() -> Mount:
    return Mount("/dashboard", app=StaticFiles(directory=FOLDER), name="dashboard")
