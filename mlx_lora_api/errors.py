"""Errors that carry their HTTP status; `app` turns each into `{"status": "error", "message"}`.

They are plain exceptions so that the service, the CLI and the tests raise and catch the same
classes; only the web layer reads `status_code`.
"""


class ServiceError(Exception):
    status_code = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.param = param  # the request field at fault, where one is (OpenAI's error objects carry it)


class BadRequest(ServiceError):
    status_code = 400


class Unauthorized(ServiceError):
    status_code = 401


class Forbidden(ServiceError):
    status_code = 403


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class PayloadTooLarge(ServiceError):
    status_code = 413


class Invalid(ServiceError):
    status_code = 422


class TooManyJobs(ServiceError):
    status_code = 429


class Unavailable(ServiceError):
    status_code = 503
