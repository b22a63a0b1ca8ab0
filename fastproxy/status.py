"""Kubernetes `Status` error responses, rendered once per call with orjson."""
from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import orjson

# HTTP code -> Kubernetes StatusReason, as the API server pairs them.
REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    408: "Timeout",
    409: "Conflict",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    417: "BadRequest",
    422: "Invalid",
    429: "TooManyRequests",
    431: "BadRequest",
    500: "InternalError",
    502: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}

STATUS_LINES = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode())
    for status in HTTPStatus
}


def status_line(code: int) -> bytes:
    line = STATUS_LINES.get(code)
    return line if line is not None else b"HTTP/1.1 %d Unknown\r\n" % code


_date_second = 0
_date_line = b""


def date_line() -> bytes:
    """The `Date:` header line for the gateway's own responses, formatted once a second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date_line


class StatusError(Exception):
    """A refusal to answer with a Kubernetes Status; `close` ends the client connection after it."""

    def __init__(self, code: int, message: str, *, close: bool = False, reason: str | None = None,
                 details: dict[str, Any] | None = None, headers: bytes = b""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.close = close
        self.reason = reason or REASONS.get(code, "Unknown")
        self.details = details  # the Status's details: name, group, kind, causes
        self.headers = headers  # more header lines for the response (Retry-After)


def forbidden(user: str, verb: str, resource: str, group: str = "", namespace: str = "", name: str = "",
              reason: str = "") -> StatusError:
    """The API server's 403 for `user` lacking `verb` on a resource, worded as it words it."""
    qualified = f"{resource}.{group}" if group else resource
    subject = f'{qualified} "{name}"' if name else qualified
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    details: dict[str, Any] = {"kind": resource}
    if group:
        details["group"] = group
    if name:
        details["name"] = name
    return StatusError(403, f'{subject} is forbidden: User "{user}" cannot {verb} resource "{resource}" '
                            f'in API group "{group}" {scope}' + (f": {reason}" if reason else ""), details=details)


def status_body(code: int, message: str, reason: str | None = None, details: dict[str, Any] | None = None) -> bytes:
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or REASONS.get(code, "Unknown"),
    }
    if details:
        status["details"] = details
    status["code"] = code
    return orjson.dumps(status)


def status_response(code: int, message: str, *, close: bool = False, reason: str | None = None,
                    details: dict[str, Any] | None = None, extra: bytes = b"") -> bytes:
    """A complete HTTP/1.1 response carrying a Status body; `extra`: more header lines."""
    body = status_body(code, message, reason, details)
    return b"".join((
        status_line(code),
        date_line(),
        extra,
        b"Content-Type: application/json\r\nCache-Control: no-store\r\n",
        b"Content-Length: %d\r\n" % len(body),
        b"Connection: close\r\n\r\n" if close else b"\r\n",
        body,
    ))
