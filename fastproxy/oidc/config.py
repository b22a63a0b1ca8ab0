"""The `[oidc]` table: the OpenID Connect provider's issuer, lifetimes and registered clients.

A client's secret is configured as the SHA-256 (hex) of a random secret of at least 32 bytes, the
way `[[access_keys]]` are: a random secret needs no slow hash, and the configuration holds no secret.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..config import ConfigError, _Table

_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # where a redirect URI may be plain http (RFC 8252)


@dataclass(frozen=True, slots=True)
class OidcClient:
    id: str
    secret_sha256: str = ""
    redirect_uris: tuple[str, ...] = ()  # matched exactly
    name: str = ""


@dataclass(frozen=True, slots=True)
class OidcConfig:
    issuer: str  # the provider's public URL, ending in /oidc: the endpoints are below it
    clients: tuple[OidcClient, ...] = ()
    code_ttl: int = 60              # seconds an authorization code may wait for its token request
    access_token_ttl: int = 600     # seconds; also the ID token's lifetime
    refresh_token_ttl: int = 86400  # seconds; each refresh answers a new one and ends the old


def _redirect_uri(value: str, where: str) -> str:
    parts = urlsplit(value)
    if parts.fragment or "#" in value or not parts.netloc:
        raise ConfigError(f"{where}: must be an absolute URL without a fragment, not {value!r}")
    if parts.scheme != "https" and not (parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS):
        raise ConfigError(f"{where}: must be https (http only on a loopback address), not {value!r}")
    return value


def _client(data: object, where: str) -> OidcClient:
    t = _Table(data, where)
    client_id = t.str("id", required=True) or ""
    if not client_id or not client_id.isprintable() or " " in client_id:
        raise ConfigError(f"{t.key('id')}: must be a non-empty string without spaces")
    secret = t.str("secret_sha256", required=True) or ""
    if not _HEX_SHA256.fullmatch(secret):
        raise ConfigError(f"{t.key('secret_sha256')}: must be the SHA-256 of the client secret as 64 lowercase hex digits")
    uris = t.strings("redirect_uris")
    if not uris:
        raise ConfigError(f"{t.key('redirect_uris')}: must list at least one redirect URI")
    client = OidcClient(client_id, secret, tuple(_redirect_uri(uri, f"{t.key('redirect_uris')}[{i}]")
                                                 for i, uri in enumerate(uris)), t.str("name", "") or "")
    t.finish()
    return client


def parse_oidc_config(data: object, tokens_issuer: str | None) -> OidcConfig:
    """The [oidc] table; ConfigError naming the key otherwise. `tokens_issuer`: [tokens] issuer, which the
    provider's must differ from, so that no ID token is ever taken for a gateway token."""
    t = _Table(data, "oidc")
    issuer = (t.str("issuer", required=True) or "").rstrip("/")
    parts = urlsplit(issuer)
    if parts.scheme != "https" or not parts.netloc or parts.query or parts.fragment or not parts.path.endswith("/oidc"):
        raise ConfigError(f"{t.key('issuer')}: must be the gateway's https URL ending in /oidc, not {issuer!r}")
    if tokens_issuer is None:
        raise ConfigError(f"{t.key('issuer')}: the OpenID Connect provider signs with the gateway's keys: "
                          "it needs [tokens] signing_keys_dir")
    if issuer == tokens_issuer.rstrip("/"):
        raise ConfigError(f"{t.key('issuer')}: must differ from tokens.issuer")
    entries = t._get("clients", list, [])  # type: ignore[no-untyped-call]
    clients = tuple(_client(item, f"oidc.clients[{i}]") for i, item in enumerate(entries))
    ids = [client.id for client in clients]
    for i, client_id in enumerate(ids):
        if client_id in ids[:i]:
            raise ConfigError(f"oidc.clients[{i}].id: duplicate client id {client_id!r}")
    config = OidcConfig(issuer, clients, code_ttl=t.positive("code_ttl", int, 60),
                        access_token_ttl=t.positive("access_token_ttl", int, 600),
                        refresh_token_ttl=t.positive("refresh_token_ttl", int, 86400))
    if config.code_ttl > 600:
        raise ConfigError(f"{t.key('code_ttl')}: must be at most 600 seconds (RFC 6749 4.1.2), not {config.code_ttl}")
    t.finish()
    return config
