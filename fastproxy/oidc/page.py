"""The login page of /oidc/authorize: plain server-rendered HTML, no script, no external asset.

Pure functions: the page, its security headers, and the CSRF check. The CSRF token is a random
value both in a cookie (SameSite=Strict, HttpOnly, only below /oidc/) and in the form; a POST whose
two copies differ was not sent from this page (double-submit cookie: no server-side state, so
any worker can check it).
"""
from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable, Mapping
from html import escape
from urllib.parse import urlsplit

CSRF_COOKIE = "fastproxy_oidc_csrf"
CSRF_FIELD = "csrf_token"
LOGIN_FIELDS = frozenset((CSRF_FIELD, "username", "password"))  # the page's own fields; the rest is the request


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_cookie(token: str) -> bytes:
    return f"{CSRF_COOKIE}={token}; Path=/oidc/; Secure; HttpOnly; SameSite=Strict".encode()


def cookie_value(cookie_headers: Iterable[bytes], name: str) -> str | None:
    """The value of cookie `name`; None when absent or given twice (fail closed)."""
    found = []
    for header in cookie_headers:
        for pair in header.decode("latin-1").split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key == name:
                found.append(value)
    return found[0] if len(found) == 1 else None


def csrf_matches(cookie: str, field: str | None) -> bool:
    return bool(cookie) and field is not None and hmac.compare_digest(cookie.encode(), field.encode())


def page_headers(redirect_uri: str) -> list[tuple[bytes, bytes]]:
    """No script, style only inline, no framing; the form may go to the gateway and, through the
    redirect it answers, to the client's (registered, exact) redirect URI."""
    parts = urlsplit(redirect_uri)
    target = f"{parts.scheme}://{parts.netloc}"
    policy = f"default-src 'none'; style-src 'unsafe-inline'; form-action 'self' {target}; frame-ancestors 'none'; base-uri 'none'"
    return [(b"Content-Security-Policy", policy.encode()), (b"X-Frame-Options", b"DENY"),
            (b"Referrer-Policy", b"no-referrer"), (b"X-Content-Type-Options", b"nosniff")]


def login_page(client_name: str, request: Mapping[str, str], csrf_token: str, message: str = "") -> bytes:
    """The form: the authorization request's parameters ride along as hidden fields."""
    hidden = "".join(f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">\n'
                     for name, value in request.items() if name not in LOGIN_FIELDS)
    note = f'<p class="error" role="alert">{escape(message)}</p>\n' if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>Log in</title>
<style>body{{font-family:sans-serif;max-width:22em;margin:4em auto}}label,input,button{{display:block;width:100%;margin:.3em 0}}
.error{{color:#a00}}</style></head>
<body><h1>Log in</h1><p>to continue to {escape(client_name)}</p>
{note}<form method="post" action="authorize">
{hidden}<input type="hidden" name="{CSRF_FIELD}" value="{escape(csrf_token)}">
<label for="username">Username</label><input id="username" name="username" autocomplete="username" required>
<label for="password">Password</label><input id="password" name="password" type="password" autocomplete="current-password" required>
<button id="login" type="submit">Log in</button>
</form></body></html>
""".encode()
