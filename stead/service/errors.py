"""What the service layer refuses, and why: one reason per error, never a stack trace."""

from __future__ import annotations

import math


class ServiceError(Exception):
    """A refusal with a reason, raised by the service layer and shown as is: `status` is the
    HTTP status the API answers with (the web pages render the same reason)."""

    status: int = 400
    code: str = "bad_request"
    headers: dict[str, str] | None = None

    def __init__(self, detail: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.code = code or self.code
        self.status = status or self.status


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class NotFound(ServiceError):
    status, code = 404, "not_found"


class Conflict(ServiceError):
    status, code = 409, "conflict"


class Invalid(ServiceError):
    status, code = 422, "invalid"


class Unavailable(ServiceError):
    status, code = 503, "unavailable"


class RateLimited(ServiceError):
    status, code = 429, "rate_limited"

    def __init__(self, detail: str, *, retry_after: float) -> None:
        super().__init__(detail)
        # Retry-After is whole seconds (RFC 9110); rounding down would invite a second refusal.
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
