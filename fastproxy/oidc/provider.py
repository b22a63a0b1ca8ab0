"""The OpenID Connect protocol, done by authlib: the authorization-code grant with PKCE (S256 only,
required) and an ID token, the refresh grant, client authentication, the spec's error answers.

authlib's calls are synchronous and some write the state store: the endpoints (oidc.endpoints) run
them on a thread. Codes and refresh tokens are taken from the store atomically, so each works once
whichever worker it reaches; access tokens are opaque and live in the store too, so no gateway
credential check (tokens, access keys) ever accepts one. ID tokens are signed with the gateway's
keys, but with the provider's own issuer, which [tokens] verification refuses (oidc.config).
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from authlib.oauth2 import AuthorizationServer, OAuth2Request
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin, grants
from authlib.oauth2.rfc6749.errors import InvalidRequestError
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core import AuthorizationCodeMixin, UserInfo
from authlib.oidc.core.grants import OpenIDCode
from joserfc.jwk import KeyParameters, import_key

from ..auth.tokens import KeySet
from ..store import Snapshot, StateAdmin, User
from ..store.base import user_groups
from .config import OidcClient, OidcConfig

SCOPES = ("openid", "profile", "email", "groups", "offline_access")
CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]
CODE, ACCESS, REFRESH = "code", "access", "refresh"  # the kinds of grant the store keeps


@dataclass(frozen=True, slots=True)
class Grant:
    """What a code, an access token or a refresh token stands for."""

    user: str        # the store user's name
    client_id: str
    scope: str
    auth_time: int   # when the user logged in
    redirect_uri: str = ""
    nonce: str = ""
    code_challenge: str = ""
    code_challenge_method: str = ""


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class Grants:
    """Grants in the state store by their secret's digest (the store never holds a secret); blocking."""

    def __init__(self, store: StateAdmin):
        self.store = store

    def put(self, kind: str, secret: str, grant: Grant, ttl: int) -> None:
        self.store.put_grant(digest(secret), kind, orjson.dumps(asdict(grant)).decode(), time.time() + ttl)

    def take(self, kind: str, secret: str) -> Grant | None:
        return _grant(self.store.take_grant(digest(secret), kind, time.time()))

    def read(self, kind: str, secret: str) -> Grant | None:
        return _grant(self.store.read_grant(digest(secret), kind, time.time()))


def _grant(data: str | None) -> Grant | None:
    return None if data is None else Grant(**orjson.loads(data))


class Client(ClientMixin):  # type: ignore[misc]
    """A registered client: confidential (a secret), redirect URIs matched exactly."""

    def __init__(self, config: OidcClient):
        self.config = config

    def get_client_id(self) -> str:
        return self.config.id

    def get_default_redirect_uri(self) -> None:
        return None  # every request names its redirect URI

    def get_allowed_scope(self, scope: str) -> str:
        return " ".join(item for item in scope.split() if item in SCOPES)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.config.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return hmac.compare_digest(hashlib.sha256(client_secret.encode()).hexdigest(), self.config.secret_sha256)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method in CLIENT_AUTH_METHODS

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("authorization_code", "refresh_token")


class Request(OAuth2Request):  # type: ignore[misc]
    """One HTTP request as authlib reads it: query arguments, form fields, headers."""

    def __init__(self, method: str, uri: str, args: Mapping[str, list[str]], form: Mapping[str, list[str]],
                 headers: Mapping[str, str]):
        super().__init__(method, uri, headers=headers)
        self._args = {name: values[0] for name, values in args.items()}
        self._form = {name: values[0] for name, values in form.items()}
        merged = {**args, **form}
        self.payload = BasicOAuth2Payload({name: values[0] for name, values in merged.items()})
        self.payload._datalist = {name: list(values) for name, values in merged.items()}

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


class Code(AuthorizationCodeMixin):  # type: ignore[misc]
    def __init__(self, grant: Grant):
        self.grant = grant

    def get_redirect_uri(self) -> str:
        return self.grant.redirect_uri

    def get_scope(self) -> str:
        return self.grant.scope

    def get_nonce(self) -> str | None:
        return self.grant.nonce or None

    def get_auth_time(self) -> int:
        return self.grant.auth_time

    @property
    def code_challenge(self) -> str:
        return self.grant.code_challenge

    @property
    def code_challenge_method(self) -> str:
        return self.grant.code_challenge_method


class RefreshToken(TokenMixin):  # type: ignore[misc]
    def __init__(self, grant: Grant):
        self.grant = grant

    def check_client(self, client: Client) -> bool:
        return client.get_client_id() == self.grant.client_id

    def get_scope(self) -> str:
        return self.grant.scope

    def get_expires_in(self) -> int:
        return 0

    def is_expired(self) -> bool:
        return False  # the store answers live grants only

    def is_revoked(self) -> bool:
        return False  # taken from the store: a used one is gone


class CodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = CLIENT_AUTH_METHODS
    server: Provider

    def validate_authorization_request(self) -> str:
        redirect_uri: str = super().validate_authorization_request()
        # authlib leaves PKCE optional for a confidential client: here every request needs it, in S256.
        payload = self.request.payload
        if not payload.data.get("code_challenge") or payload.data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("PKCE is required: code_challenge with code_challenge_method=S256",
                                      state=payload.state, redirect_uri=redirect_uri)
        return redirect_uri

    def save_authorization_code(self, code: str, request: Request) -> None:
        data = request.payload.data
        user: User = request.user
        self.server.grants.put(CODE, code, Grant(
            user.name, request.client.get_client_id(), request.payload.scope or "", int(time.time()),
            redirect_uri=request.payload.redirect_uri, nonce=data.get("nonce") or "",
            code_challenge=data["code_challenge"], code_challenge_method=data["code_challenge_method"]),
            self.server.config.code_ttl)

    def query_authorization_code(self, code: str, client: Client) -> Code | None:
        grant = self.server.grants.take(CODE, code)  # used up here, whatever follows
        return Code(grant) if grant is not None and grant.client_id == client.get_client_id() else None

    def delete_authorization_code(self, authorization_code: Code) -> None:
        pass  # taken by query_authorization_code

    def authenticate_user(self, authorization_code: Code) -> User | None:
        return self.server.user(authorization_code.grant.user)


class RefreshGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = CLIENT_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True  # each refresh token works once: the answer carries the next
    server: Provider

    def authenticate_refresh_token(self, refresh_token: str) -> RefreshToken | None:
        grant = self.server.grants.take(REFRESH, refresh_token)
        return RefreshToken(grant) if grant is not None else None

    def authenticate_user(self, refresh_token: RefreshToken) -> User | None:
        return self.server.user(refresh_token.grant.user)

    def revoke_old_credential(self, refresh_token: RefreshToken) -> None:
        pass  # taken by authenticate_refresh_token


class IdToken(OpenIDCode):  # type: ignore[misc]
    def __init__(self, provider: Provider):
        super().__init__(require_nonce=False)
        self.provider = provider

    def exists_nonce(self, nonce: str, request: Request) -> bool:
        return False  # a nonce is the client's to check in the ID token; codes are single-use anyway

    def get_client_claims(self, client: Client) -> dict[str, Any]:
        return {"iss": self.provider.config.issuer, "aud": [client.get_client_id()],
                "exp": int(time.time()) + self.provider.config.access_token_ttl}

    def get_client_algorithm(self, client: Client) -> str:
        return self.provider.keyset.active.algorithm

    def get_encode_header(self, client: Client) -> dict[str, str]:
        key = self.provider.keyset.active
        return {"alg": key.algorithm, "kid": key.kid, "typ": "JWT"}

    def resolve_client_private_key(self, client: Client) -> Any:
        return self.provider.signing_key()

    def generate_user_info(self, user: User, scope: str) -> UserInfo:
        return UserInfo(self.provider.claims(user, scope))


class Provider(AuthorizationServer):  # type: ignore[misc]
    """The authorization server: one per worker, its calls run on the endpoints' thread."""

    def __init__(self, config: OidcConfig, keyset: KeySet, grants_: Grants, snapshot: Callable[[], Snapshot]):
        super().__init__(scopes_supported=list(SCOPES))
        self.config = config
        self.keyset = keyset
        self.grants = grants_
        self.snapshot = snapshot
        self.clients = {client.id: Client(client) for client in config.clients}
        self._signing: tuple[str, Any] = ("", None)  # (kid, joserfc key)
        self.register_grant(CodeGrant, [CodeChallenge(required=True), IdToken(self)])
        self.register_grant(RefreshGrant)
        self.register_token_generator("default", BearerTokenGenerator(
            access_token_generator=_random_token, refresh_token_generator=_random_token,
            expires_generator=lambda client, grant_type: config.access_token_ttl))

    def query_client(self, client_id: str) -> Client | None:
        return self.clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: Request) -> None:
        user: User = request.user
        auth_time = (request.authorization_code.grant.auth_time if request.authorization_code is not None
                     else request.refresh_token.grant.auth_time if request.refresh_token is not None else int(time.time()))
        grant = Grant(user.name, request.client.get_client_id(), token.get("scope") or "", auth_time)
        self.grants.put(ACCESS, token["access_token"], grant, self.config.access_token_ttl)
        if "refresh_token" in token:
            self.grants.put(REFRESH, token["refresh_token"], grant, self.config.refresh_token_ttl)

    def create_oauth2_request(self, request: Request) -> Request:
        return request

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> tuple[int, Any, list[tuple[str, str]]]:
        return status, body, headers

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass

    # --- what the grants and the endpoints share ----------------------------------------------

    def user(self, name: str) -> User | None:
        """The store user `name`, if it may still log in."""
        user = self.snapshot().users.get(name)
        return user if user is not None and not user.disabled else None

    def claims(self, user: User, scope: str) -> dict[str, Any]:
        """The claims about `user` that `scope` asks for (ID token and userinfo alike)."""
        scopes = set(scope.split())
        claims: dict[str, Any] = {"sub": user.subject or user.name}
        if "profile" in scopes:
            claims["preferred_username"] = user.username or user.name
            claims["name"] = user.display_name or user.username or user.name
        if "email" in scopes and user.email:
            claims["email"] = user.email
        if "groups" in scopes:
            snapshot = self.snapshot()
            teams = [team for team in snapshot.teams.values() if user.name in team.members]
            claims["groups"] = user_groups(user, sorted(teams, key=lambda team: team.name))
        return claims

    def signing_key(self) -> Any:
        """The active gateway key as joserfc takes it (converted once per key)."""
        active = self.keyset.active
        if self._signing[0] != active.kid:
            parameters: KeyParameters = {"kid": active.kid, "alg": active.algorithm, "use": "sig"}
            key = (import_key(active.private_key, "RSA", parameters) if active.algorithm == "RS256"
                   else import_key(active.private_key, "EC", parameters))
            self._signing = (active.kid, key)
        return self._signing[1]


def _random_token(**_: Any) -> str:
    return secrets.token_urlsafe(32)
