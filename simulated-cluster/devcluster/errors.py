"""API errors rendered as `Status` objects, the shape every Kubernetes client decodes."""
from __future__ import annotations

from typing import Any

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Gone",
    415: "UnsupportedMediaType",
    422: "Invalid",
    500: "InternalError",
}


class ApiError(Exception):
    """An error answered to the client as a `Status` with the matching HTTP code."""

    def __init__(self, code: int, message: str, *, reason: str | None = None,
                 name: str | None = None, group: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details: dict[str, Any] = {}
        if name is not None:
            self.details["name"] = name
        if group is not None:
            self.details["group"] = group
        if kind is not None:
            self.details["kind"] = kind

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details:
            body["details"] = dict(self.details)
        body["code"] = self.code
        return body


def not_found(resource: str, name: str, group: str = "") -> ApiError:
    return ApiError(404, f'{_qualified(resource, group)} "{name}" not found',
                    name=name, group=group, kind=resource)


def already_exists(resource: str, name: str, group: str = "") -> ApiError:
    return ApiError(409, f'{_qualified(resource, group)} "{name}" already exists',
                    reason="AlreadyExists", name=name, group=group, kind=resource)


def conflict(resource: str, name: str, group: str = "") -> ApiError:
    return ApiError(
        409,
        f'Operation cannot be fulfilled on {_qualified(resource, group)} "{name}": the object has '
        "been modified; please apply your changes to the latest version and try again",
        name=name, group=group, kind=resource)


def invalid(kind: str, name: str, message: str, group: str = "") -> ApiError:
    return ApiError(422, f'{kind} "{name}" is invalid: {message}', name=name, group=group, kind=kind)


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def expired(message: str) -> ApiError:
    return ApiError(410, message, reason="Expired")


def _qualified(resource: str, group: str) -> str:
    return f"{resource}.{group}" if group else resource
