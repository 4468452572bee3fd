"""`create_app(settings)`: routes, lifespan (starts and stops the job runner), error handling."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response

from .. import errors
from ..config import Settings
from ..service import Service
from . import openai, routes
from .bodies import ErrorBody
from .codec import respond
from .security import Guard

log = logging.getLogger("mlx_lora_api")


def error_response(
    request: Request,
    status_code: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    param: str | None = None,
) -> Response:
    # OpenAI's clients read their own error shape on the /v1 routes.
    if request.url.path.startswith("/v1/"):
        return respond(openai.error_body(status_code, message, param), status_code, headers)
    return respond(ErrorBody(message), status_code, headers)


async def service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.ServiceError)
    return error_response(request, exc.status_code, exc.message, exc.headers, exc.param)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(request, exc.status_code, messages.get(exc.status_code, str(exc.detail)), exc.headers)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(request, 500, f"internal error: {type(exc).__name__}")


def create_app(settings: Settings, service: Service | None = None) -> Starlette:
    service = service or Service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = Starlette(
        routes=routes.routes(),
        lifespan=lifespan,
        middleware=[
            Middleware(
                Guard, api_key=settings.api_key, bind_host=settings.host, allowed_origins=settings.allowed_origins
            )
        ],
        exception_handlers={
            errors.ServiceError: service_error,
            HTTPException: http_error,
            Exception: unexpected_error,
        },
    )
    app.state.settings = settings
    app.state.service = service
    return app
