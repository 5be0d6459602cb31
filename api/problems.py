"""RFC 9457 problem responses with a machine-readable ``code``."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

PROBLEM_TYPE = "urn:creativeflow:problem:"

DOMAIN_STATUS = {
    "not_found": 404,
    "invalid_state": 409,
    "unknown_sample": 422,
    "insufficient_credits": 402,
    "quota_exceeded": 402,
    "validation_error": 422,
    "external_billing": 409,
    "generation_unreadable": 409,
}


class Problem(Exception):
    """Raised anywhere in the API layer; rendered as ``application/problem+json``."""

    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.extra = extra

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE + self.code,
            "title": HTTPStatus(self.status).phrase,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


def problem_response(status: int, body: Any, headers: dict[str, str] | None = None
                     ) -> JSONResponse:
    media = "application/problem+json" if status >= 400 else "application/json"
    return JSONResponse(body, status_code=status, media_type=media, headers=headers)


def field_errors(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[dict[str, str]]:
    errors = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in (*prefix, *err["loc"])]
        errors.append({"field": ".".join(loc) or "body", "message": err["msg"]})
    return errors


def validation_problem(errors: list[dict[str, str]], detail: str = "the request is invalid"
                       ) -> Problem:
    return Problem(422, "validation_error", detail, errors=errors)
