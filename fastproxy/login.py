"""The /auth/ endpoints, shaped as the Loft API has them (authentication.loft.sh/v1 objects).

- `POST /auth/password/login` `{"username", "password"}`: an `AccessKey` object holding a new state-store
  access key of type Login, for `[login] key_ttl` seconds.
- `POST /auth/token` `{"key"}` (or the bearer credential): a `Token`, a Direct Cluster Endpoint token
  this gateway signs for the key's identity and scope, for `[login] token_ttl` seconds.
- `POST /auth/logout` with a Login key as the bearer credential: that key is deleted.
- `GET /auth/info`: the login methods this gateway offers.

Passwords are checked on threads of their own (auth.passwords); a user name that does not exist,
has no password or is disabled is checked against a dummy hash and refused with the same words,
so neither the answer nor its time tells it apart from a wrong password. Failed logins back off
per user name and per client address (auth.limiter), answered 429 with `Retry-After`.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import headers as hdrs
from .auth.limiter import Backoff, FailureTable, client_group, retry_after_header
from .auth.passwords import MAX_PASSWORD_BYTES, CheckerBusy, PasswordChecker
from .auth.tokens import KeySet, issue_token
from .local import LocalResponder
from .management.api import token_audiences
from .management.objects import timestamp
from .status import StatusError, status_body

if TYPE_CHECKING:
    from .auth.credentials import Authenticator
    from .clusters import ClusterRegistry
    from .config import Config
    from .context import Observers, RequestContext
    from .exchange import Connection
    from .store import AccessKey, StateAdmin, User

API_VERSION = "authentication.loft.sh/v1"
FORGET_AFTER = 900.0      # seconds without a failure after which a user's or address's count starts again
MAX_USERNAME_CHARS = 253  # a DNS subdomain's length: longer names exist nowhere
REFUSED = "Unauthorized: invalid username or password"


class TooMany(Exception):
    """A login that must wait `wait` seconds (429 with Retry-After)."""

    def __init__(self, wait: float, message: str):
        super().__init__(message)
        self.wait, self.message = wait, message


def login_fields(username: object, password: object) -> tuple[str, str]:
    """The user name and password a login asks with, or StatusError 400 (never repeating the password)."""
    if not isinstance(username, str) or not 0 < len(username) <= MAX_USERNAME_CHARS:
        raise StatusError(400, f"username must be a string of 1 to {MAX_USERNAME_CHARS} characters")
    if not isinstance(password, str) or not password or len(password.encode()) > MAX_PASSWORD_BYTES:
        raise StatusError(400, f"password must be a string of 1 to {MAX_PASSWORD_BYTES} bytes")
    return username, password


class AuthEndpoints:
    """The handler of /auth/: one per worker; `write` runs a store write on the management thread and
    returns once this worker's snapshot holds it (ManagementAPI.write)."""

    def __init__(self, config: Config, authenticator: Authenticator, clusters: ClusterRegistry,
                 write: Callable[[Callable[[StateAdmin], Any]], Awaitable[Any]], keyset: KeySet | None):
        self.login = login = config.login
        self.tokens = config.tokens
        self.authenticator = authenticator
        self.clusters = clusters
        self.write = write
        self.keyset = keyset
        # Only with users to log in: the checker makes its dummy hash (64 MiB, tens of ms) as it starts.
        self.checker = (PasswordChecker(login.verify_threads, login.max_waiting)
                        if authenticator.store is not None else None)
        policy = Backoff(login.free_failures, login.max_backoff, max(FORGET_AFTER, 3 * login.max_backoff))
        self.by_user = FailureTable(policy)
        self.by_address = FailureTable(policy)
        self._usernames: tuple[int, dict[str, User | None]] = (-1, {})  # snapshot version, username -> user

    def responder(self, client: Connection, ctx: RequestContext, observers: Observers, keep_alive: bool) -> AuthRequest:
        return AuthRequest(client, ctx, observers, keep_alive, self)

    def user_named(self, username: str) -> User | None:
        """The user who logs in as `username`; None if none does, or more than one (fail closed)."""
        store = self.authenticator.store
        if store is None:
            return None
        snapshot = store.snapshot
        version, index = self._usernames
        if version != snapshot.version:
            index = {}
            for user in snapshot.users.values():
                login = user.username or user.name
                index[login] = None if login in index else user
            self._usernames = (snapshot.version, index)
        return index.get(username)

    async def verify(self, username: str, password: str, client_ip: str) -> User:
        """The user whose password this is, under the back-off; StatusError 401 (REFUSED) or TooMany otherwise."""
        checker = self.checker
        assert checker is not None  # callers answer 503 without a store
        address, now = client_group(client_ip), time.monotonic()
        wait = max(self.by_user.retry_after(username, now), self.by_address.retry_after(address, now))
        if wait > 0:
            raise TooMany(wait, "too many failed logins: try again later")
        # Counted as failures until the password is found right: parallel attempts see each other.
        self.by_user.count(username, now)
        self.by_address.count(address, now)
        user = self.user_named(username)
        hashed = user.password_hash if user is not None and user.password_hash and not user.disabled else None
        try:
            matches = await checker.check(hashed, password)
        except CheckerBusy:
            self.by_user.forgive(username)
            self.by_address.forgive(address)
            raise TooMany(1, "too many logins in progress: try again shortly") from None
        if not matches or user is None:
            answered = time.monotonic()
            self.by_user.failed(username, answered)
            self.by_address.failed(address, answered)
            raise StatusError(401, REFUSED)
        self.by_user.clear(username)
        self.by_address.forgive(address)
        return user

    async def create_login_key(self, user: User, display_name: str) -> tuple[AccessKey, str]:
        """A new Login access key of `user`, with the login lifetime: (the key, its secret)."""
        owner, ttl = user.name, self.login.key_ttl
        created: tuple[AccessKey, str] = await self.write(lambda admin: admin.create_access_key(
            user=owner, type="Login", ttl=ttl, display_name=display_name))
        return created

    async def revoke_login_key(self, credential: bytes) -> str | None:
        """Revoke the Login access key `credential` is; its name, or None if it is no Login key."""
        store = self.authenticator.store
        entry = store.snapshot.resolve(credential, time.time()) if store is not None else None
        if entry is None or entry.access_key.type != "Login":
            return None
        name = entry.access_key.name
        await self.write(lambda admin: admin.delete_access_key(name))
        return name

    def tick(self) -> None:
        now = time.monotonic()
        self.by_user.prune(now)
        self.by_address.prune(now)

    def close(self) -> None:
        if self.checker is not None:
            self.checker.close()


class AuthRequest(LocalResponder):
    """One request below /auth/."""

    __slots__ = ("api",)

    body_limit = 16 * 1024

    def __init__(self, client: Connection, ctx: RequestContext, observers: Observers, keep_alive: bool,
                 api: AuthEndpoints):
        super().__init__(client, ctx, observers, keep_alive)
        self.api = api

    def handle(self) -> None:
        assert self.ctx.route is not None
        path = self.ctx.route.path.rstrip("/")
        method = self.ctx.head.method
        served = _ENDPOINTS.get(path)
        if served is None:
            raise StatusError(404, f"the path /auth{path} is not served by this gateway")
        if method not in ((b"GET", b"HEAD") if served == b"GET" else (served,)):
            raise StatusError(405, f"/auth{path} answers {served.decode()} only")
        if path == "/password/login":
            self.run(self.password_login())
        elif path == "/token":
            self.token()
        elif path == "/logout":
            self.run(self.logout())
        else:
            self.send_json(200, {"kind": "Info", "apiVersion": API_VERSION, "metadata": {},
                                 "methods": {"password": {"enabled": self.api.authenticator.store is not None}}})

    # --- the endpoints -----------------------------------------------------------------------

    async def password_login(self) -> None:
        api = self.api
        if api.checker is None:
            raise StatusError(503, "this gateway has no [state] store: there are no users to log in")
        username, password = self.login_body()
        try:
            user = await api.verify(username, password, self.ctx.head.client_ip.decode("latin-1"))
        except TooMany as refusal:
            self.too_many(refusal.wait, refusal.message)
            return
        key, secret = await api.create_login_key(user, "password login")
        self.send_json(200, {"kind": "AccessKey", "apiVersion": API_VERSION,
                             "metadata": {"name": key.name, "creationTimestamp": timestamp(key.created)},
                             "user": user.name, "username": user.username or user.name, "accessKey": secret})

    def token(self) -> None:
        api = self.api
        if api.keyset is None or api.tokens is None:
            raise StatusError(503, "this gateway does not issue tokens: it has no [tokens] signing_keys_dir")
        key = self.json_object().get("key") if self.body else None
        if key is not None and (not isinstance(key, str) or not key):
            raise StatusError(400, "key must be a non-empty string")
        credential = key.encode() if key else self.bearer()
        identity = self.ctx.identity = api.authenticator.authenticate(credential, None)
        if identity.source.startswith("token:"):
            raise StatusError(401, "Unauthorized: a token cannot be exchanged for another; present an access key")
        scope = None if identity.scope is None else identity.scope.source.to_dict()
        token = issue_token(api.keyset, issuer=api.tokens.issuer, subject=identity.user, groups=identity.groups,
                            audience=token_audiences(scope, [upstream.cluster.name for upstream in api.clusters]),
                            scope=scope, ttl=api.login.token_ttl)
        self.send_json(200, {"kind": "Token", "apiVersion": API_VERSION, "metadata": {"creationTimestamp": None},
                             "token": token})

    async def logout(self) -> None:
        store = self.api.authenticator.store
        if store is None:
            raise StatusError(503, "this gateway has no [state] store: there are no login keys")
        credential = self.bearer()
        self.ctx.identity = self.api.authenticator.authenticate(credential, None)
        name = await self.api.revoke_login_key(credential)
        if name is None:
            raise StatusError(400, "logout revokes the Login access key it is called with; this credential is none")
        self.send_json(200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                             "message": f"access key {name} revoked", "code": 200})

    # --- helpers -----------------------------------------------------------------------------

    def bearer(self) -> bytes:
        return hdrs.bearer_credential(hdrs.scan_client_headers(self.ctx.head.headers), None)

    def json_object(self) -> dict[str, Any]:
        body = self.json_body()
        if not isinstance(body, dict):
            raise StatusError(400, "the request body must be a JSON object")
        return body

    def login_body(self) -> tuple[str, str]:
        body = self.json_object()
        return login_fields(body.get("username"), body.get("password"))

    def too_many(self, wait: float, message: str) -> None:
        seconds = retry_after_header(wait)
        self.ctx.message = message
        self.send(429, status_body(429, message, details={"retryAfterSeconds": seconds}),
                  headers=[(b"Retry-After", b"%d" % seconds)])


# path below /auth -> the method it answers
_ENDPOINTS = {"/password/login": b"POST", "/token": b"POST", "/logout": b"POST", "/info": b"GET"}
