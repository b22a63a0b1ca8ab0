"""The /oidc/ endpoints: an OpenID Connect provider for other tools, on the gateway's signing keys.

- `GET /oidc/.well-known/openid-configuration`, `GET /oidc/jwks`: discovery and the public keys.
- `GET /oidc/authorize`: the request checked (client, exact redirect URI, PKCE S256), then the
  login page (oidc.page); `POST /oidc/authorize`: CSRF token, password (the /auth/ login's checks
  and back-off), then a redirect to the client with a single-use code.
- `POST /oidc/token`: code (with the PKCE verifier) or refresh token -> ID, access, refresh tokens.
- `GET|POST /oidc/userinfo`: the claims for an access token.

Errors are the OAuth ones (`{"error": ...}`, or `error=` on a redirect to a registered redirect URI
only). The protocol is authlib's (oidc.provider); its store writes run on a thread of their own.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
from authlib.oauth2 import OAuth2Error

from ..auth.limiter import retry_after_header
from ..auth.passwords import MAX_PASSWORD_BYTES
from ..local import LocalResponder
from ..login import MAX_USERNAME_CHARS, TooMany
from ..status import StatusError
from .page import CSRF_COOKIE, CSRF_FIELD, LOGIN_FIELDS, cookie_value, csrf_cookie, csrf_matches, login_page, new_csrf_token, page_headers
from .provider import ACCESS, CLIENT_AUTH_METHODS, SCOPES, Grants, Provider, Request

if TYPE_CHECKING:
    from ..auth.tokens import KeySet
    from ..context import Observers, RequestContext
    from ..exchange import Connection
    from ..login import AuthEndpoints
    from ..store import StateAdmin
    from .config import OidcConfig

HTML = b"text/html; charset=utf-8"
FORM = "application/x-www-form-urlencoded"


def discovery(issuer: str, algorithm: str) -> dict[str, Any]:
    return {"issuer": issuer, "authorization_endpoint": f"{issuer}/authorize", "token_endpoint": f"{issuer}/token",
            "userinfo_endpoint": f"{issuer}/userinfo", "jwks_uri": f"{issuer}/jwks",
            "response_types_supported": ["code"], "grant_types_supported": ["authorization_code", "refresh_token"],
            "subject_types_supported": ["public"], "id_token_signing_alg_values_supported": [algorithm],
            "scopes_supported": list(SCOPES), "token_endpoint_auth_methods_supported": CLIENT_AUTH_METHODS,
            "code_challenge_methods_supported": ["S256"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "name", "preferred_username",
                                 "email", "groups"]}


class OidcEndpoints:
    """The handler of /oidc/: one per worker."""

    def __init__(self, config: OidcConfig, keyset: KeySet, store: StateAdmin, login: AuthEndpoints):
        self.config = config
        self.keyset = keyset
        self.login = login
        reader = login.authenticator.store
        assert reader is not None  # [oidc] needs [state] (config.py)
        self.provider = Provider(config, keyset, Grants(store), lambda: reader.snapshot)
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fastproxy-oidc")

    def responder(self, client: Connection, ctx: RequestContext, observers: Observers, keep_alive: bool) -> OidcRequest:
        return OidcRequest(client, ctx, observers, keep_alive, self)

    async def blocking(self, call: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, call, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class OidcRequest(LocalResponder):
    """One request below /oidc/."""

    __slots__ = ("api",)

    body_limit = 16 * 1024

    def __init__(self, client: Connection, ctx: RequestContext, observers: Observers, keep_alive: bool,
                 api: OidcEndpoints):
        super().__init__(client, ctx, observers, keep_alive)
        self.api = api

    def handle(self) -> None:
        assert self.ctx.route is not None
        path, method = self.ctx.route.path.rstrip("/"), self.ctx.head.method
        allowed = _ENDPOINTS.get(path)
        if allowed is None:
            raise StatusError(404, f"the path /oidc{path} is not served by this gateway")
        if method not in allowed:
            raise StatusError(405, f"/oidc{path} answers {', '.join(m.decode() for m in allowed)} only")
        api = self.api
        if path == "/.well-known/openid-configuration":
            self.send_json(200, discovery(api.config.issuer, api.keyset.active.algorithm))
        elif path == "/jwks":
            self.send_json(200, api.keyset.jwks())
        elif path == "/authorize" and method == b"POST":
            self.run(self.log_in())
        elif path == "/authorize":
            self.authorize_page()
        elif path == "/token":
            self.run(self.token())
        else:
            self.run(self.userinfo())

    # --- the endpoints -----------------------------------------------------------------------

    def authorize_page(self) -> None:
        request = self.oauth_request("/authorize", self.query(), {})
        try:
            grant = self.api.provider.get_consent_grant(request)
        except OAuth2Error as error:
            self.answer(*self.api.provider.handle_error_response(request, error))
            return
        token = new_csrf_token()
        self.show_page(grant, request.payload.data, token, 200, "", [(b"Set-Cookie", csrf_cookie(token))])

    async def log_in(self) -> None:
        form = self.form()
        fields = {name: values[0] for name, values in form.items()}
        cookie = cookie_value((value for name, value in self.ctx.head.headers if name.lower() == b"cookie"), CSRF_COOKIE)
        if cookie is None or not csrf_matches(cookie, fields.get(CSRF_FIELD)):
            # Not redirected: a forged request must not learn or drive anything at the client.
            self.oauth_error(400, "invalid_request", "the login form's CSRF token is missing or does not match")
            return
        authorization = {name: values for name, values in form.items() if name not in LOGIN_FIELDS}
        request = self.oauth_request("/authorize", authorization, {})
        provider = self.api.provider
        try:
            grant = provider.get_consent_grant(request)
        except OAuth2Error as error:
            self.answer(*provider.handle_error_response(request, error))
            return
        username, password = fields.get("username", ""), fields.get("password", "")
        if not 0 < len(username) <= MAX_USERNAME_CHARS or not 0 < len(password.encode()) <= MAX_PASSWORD_BYTES:
            self.show_page(grant, request.payload.data, cookie, 400, "Enter a username and a password.")
            return
        try:
            user = await self.api.login.verify(username, password, self.ctx.head.client_ip.decode("latin-1"))
        except TooMany as refusal:
            self.show_page(grant, request.payload.data, cookie, 429, refusal.message,
                           [(b"Retry-After", b"%d" % retry_after_header(refusal.wait))])
            return
        except StatusError as refusal:
            self.show_page(grant, request.payload.data, cookie, refusal.code, "Invalid username or password.")
            return
        self.answer(*await self.api.blocking(provider.create_authorization_response, request, user, grant))

    async def token(self) -> None:
        request = self.oauth_request("/token", {}, self.form())
        self.answer(*await self.api.blocking(self.api.provider.create_token_response, request))

    async def userinfo(self) -> None:
        header = next((value for name, value in self.ctx.head.headers if name.lower() == b"authorization"), b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        grant = await self.api.blocking(self.api.provider.grants.read, ACCESS, token.strip()) \
            if scheme.lower() == "bearer" and token.strip() else None
        user = self.api.provider.user(grant.user) if grant is not None else None
        if grant is None or user is None:
            self.send(401, orjson.dumps({"error": "invalid_token", "error_description": "the access token is not valid"}),
                      headers=[(b"WWW-Authenticate", b'Bearer error="invalid_token"')])
            return
        self.send_json(200, self.api.provider.claims(user, grant.scope))

    # --- helpers -----------------------------------------------------------------------------

    def query(self) -> dict[str, list[str]]:
        assert self.ctx.route is not None
        return parse_qs(self.ctx.route.query, keep_blank_values=True)

    def form(self) -> dict[str, list[str]]:
        content_type = next((value for name, value in self.ctx.head.headers if name.lower() == b"content-type"), b"")
        if content_type.split(b";")[0].strip().decode("latin-1").lower() != FORM:
            raise StatusError(415, f"the request body must be {FORM}")
        try:
            return parse_qs(b"".join(self.body).decode(), keep_blank_values=True, strict_parsing=bool(self.body))
        except (UnicodeDecodeError, ValueError):
            raise StatusError(400, "the request body is not a valid form") from None

    def oauth_request(self, endpoint: str, args: dict[str, list[str]], form: dict[str, list[str]]) -> Request:
        headers = {name.decode("latin-1").title(): value.decode("latin-1") for name, value in self.ctx.head.headers
                   if name.lower() in (b"authorization", b"content-type")}
        return Request(self.ctx.head.method.decode(), self.api.config.issuer + endpoint, args, form, headers)

    def show_page(self, grant: Any, request: dict[str, str], csrf: str, status: int, message: str,
                  extra: list[tuple[bytes, bytes]] | None = None) -> None:
        client = grant.client.config
        self.send(status, login_page(client.name or client.id, request, csrf, message), HTML,
                  headers=[*page_headers(grant.redirect_uri), *(extra or [])])

    def oauth_error(self, status: int, error: str, description: str) -> None:
        self.ctx.message = description
        self.send(status, orjson.dumps({"error": error, "error_description": description}))

    def answer(self, status: int, body: Any, headers: list[tuple[str, str]]) -> None:
        """What authlib answered: JSON, or a redirect (to a redirect URI it checked against the client)."""
        data = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else orjson.dumps(body)
        if status >= 400:
            self.ctx.message = (body.get("error", "") if isinstance(body, dict) else "")
        kept = [(name.encode(), value.encode()) for name, value in headers
                if name.lower() not in ("content-type", "cache-control", "content-length")]
        self.send(status, data, headers=kept)


_ENDPOINTS = {"/.well-known/openid-configuration": (b"GET", b"HEAD"), "/jwks": (b"GET", b"HEAD"),
              "/authorize": (b"GET", b"POST"), "/token": (b"POST",), "/userinfo": (b"GET", b"POST")}
