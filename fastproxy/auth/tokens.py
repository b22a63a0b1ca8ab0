"""Direct Cluster Endpoint tokens: JWTs the gateway signs for one cluster and verifies on its requests.

Signing keys live as PEM files in one directory, named `<created ns>.<alg>.key.pem` while active
and `<created ns>.<alg>.pub.pem` once retired: a rotation keeps only the public half of the old
key, and only until every token it signed has expired (the key set's max token lifetime).
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import secrets
import time
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from ..config import MAX_TOKEN_TTL
from ..store.base import StoreError, build_identity
from .identity import Identity
from .scopes import DEFAULT_PROJECT_NAMESPACE_PREFIX, AccessKeyScope, ScopeError, load_scope, parse_scope

SUPPORTED_ALGORITHMS = ("RS256", "ES256")
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}


class TokenError(Exception):
    """A token that must not be accepted; the message is one line, safe to show the client."""


# ---- signing keys ----

@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    algorithm: str
    created_ns: int
    public_key: Any = field(repr=False)
    private_key: Any = field(repr=False)  # None once retired

    def jwk(self) -> dict[str, str]:
        return {**_public_jwk(self.public_key), "kid": self.kid, "use": "sig", "alg": self.algorithm}


def thumbprint(public_key: Any) -> str:
    """The RFC 7638 JWK thumbprint: SHA-256 over the required members, sorted, without spaces."""
    jwk = _public_jwk(public_key)
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    digest = hashlib.sha256(orjson.dumps(members, option=orjson.OPT_SORT_KEYS)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _public_jwk(public_key: Any) -> dict[str, str]:
    algorithm = RSAAlgorithm if isinstance(public_key, rsa.RSAPublicKey) else ECAlgorithm
    jwk = algorithm.to_jwk(public_key, as_dict=True)
    jwk.pop("key_ops", None)  # "use" says it; RFC 7517 advises against giving both
    return jwk


def _algorithm_of(public_key: Any) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(public_key, ec.EllipticCurvePublicKey) and isinstance(public_key.curve, ec.SECP256R1):
        return "ES256"
    raise ValueError("signing keys must be RSA or EC P-256")


def _generate(algorithm: str) -> Any:
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"signing algorithm {algorithm!r} is not one of {', '.join(SUPPORTED_ALGORITHMS)}")


class KeySet:
    """The active signing key and the retired public keys still needed to verify tokens."""

    def __init__(self, directory: str | os.PathLike[str], *, algorithm: str = "RS256",
                 max_token_lifetime: int = MAX_TOKEN_TTL, now: float | None = None) -> None:
        """Load the keys in `directory`, creating it and a key of `algorithm` if none can sign.

        A change of `algorithm` takes effect at the next rotation.
        """
        self.directory = Path(directory)
        self.max_token_lifetime = max_token_lifetime
        self.keys: tuple[SigningKey, ...] = ()  # newest (active) first
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked():
            self._load()
            if not self.keys or self.keys[0].private_key is None:
                self._add(_generate(algorithm), now)
            self._retire_and_prune(now)

    @property
    def active(self) -> SigningKey:
        return self.keys[0]

    def rotate(self, *, algorithm: str | None = None, now: float | None = None) -> SigningKey:
        """Make a new key active; the old one keeps verifying its tokens until they expire."""
        with self._locked():
            self._load()
            self._add(_generate(algorithm or self.active.algorithm), now)
            self._retire_and_prune(now)
        return self.active

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [key.jwk() for key in self.keys]}

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # Worker processes may start together; one of them creates or rotates at a time.
        with open(self.directory / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _load(self) -> None:
        keys: dict[int, SigningKey] = {}
        for path in self.directory.glob("*.pem"):
            pieces = path.name.split(".")
            if len(pieces) != 4 or not pieces[0].isdigit() or pieces[2] not in ("key", "pub"):
                continue
            try:
                if pieces[2] == "key":
                    private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
                    public_key = private_key.public_key()
                else:
                    private_key, public_key = None, serialization.load_pem_public_key(path.read_bytes())
                algorithm = _algorithm_of(public_key)
            except ValueError as error:
                raise ValueError(f"signing key {path}: {error}") from None
            if algorithm != pieces[1]:
                raise ValueError(f"signing key {path}: holds an {algorithm} key")
            created_ns = int(pieces[0])
            # Both halves on disk (a rotation cut short): the private one is the key.
            if created_ns not in keys or private_key is not None:
                keys[created_ns] = SigningKey(thumbprint(public_key), algorithm, created_ns, public_key, private_key)
        self.keys = tuple(sorted(keys.values(), key=lambda key: key.created_ns, reverse=True))

    def _add(self, private_key: Any, now: float | None) -> None:
        created_ns = time.time_ns() if now is None else int(now * 1e9)
        created_ns = max(created_ns, self.keys[0].created_ns + 1 if self.keys else 0)
        public_key = private_key.public_key()
        algorithm = _algorithm_of(public_key)
        pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        _write_atomically(self.directory / f"{created_ns}.{algorithm}.key.pem", pem)
        self.keys = (SigningKey(thumbprint(public_key), algorithm, created_ns, public_key, private_key), *self.keys)

    def _retire_and_prune(self, now: float | None) -> None:
        """Keep the private half of the newest key only; drop keys whose tokens have all expired."""
        now_ns = time.time_ns() if now is None else int(now * 1e9)
        kept = [self.keys[0]]
        for newer, key in zip(self.keys, self.keys[1:]):
            private_path = self.directory / f"{key.created_ns}.{key.algorithm}.key.pem"
            public_path = self.directory / f"{key.created_ns}.{key.algorithm}.pub.pem"
            # Nothing signed with `key` after `newer` took over, so its tokens expire by then + lifetime.
            if now_ns > newer.created_ns + self.max_token_lifetime * 1_000_000_000:
                private_path.unlink(missing_ok=True)
                public_path.unlink(missing_ok=True)
                continue
            if key.private_key is not None:
                pem = key.public_key.public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
                _write_atomically(public_path, pem)
                private_path.unlink(missing_ok=True)
                key = SigningKey(key.kid, key.algorithm, key.created_ns, key.public_key, None)
            kept.append(key)
        self.keys = tuple(kept)


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


# ---- issuing ----

def issue_token(keyset: KeySet, *, issuer: str, subject: str, audience: str | Sequence[str], groups: Iterable[str],
                scope: AccessKeyScope | Mapping[str, Any] | None = None, ttl: int,
                now: float | None = None) -> str:
    """Sign a token for `subject` valid on cluster(s) `audience` for `ttl` seconds."""
    if not 0 < ttl <= keyset.max_token_lifetime:
        raise ValueError(f"token ttl {ttl!r} must be between 1 and {keyset.max_token_lifetime} seconds")
    groups = list(groups)
    try:
        build_identity(subject, groups, "", None)  # refuses names that could not be headers
    except StoreError as error:
        raise ValueError(str(error)) from None
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"iss": issuer, "sub": subject, "aud": [audience] if isinstance(audience, str) else list(audience), "iat": issued,
                              "exp": issued + ttl, "jti": secrets.token_urlsafe(16), "groups": groups}
    if scope is not None:
        claims["scope"] = (scope if isinstance(scope, AccessKeyScope) else parse_scope(scope)).to_dict()
    key = keyset.active
    return jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid})


# ---- verifying ----

@dataclass(frozen=True, slots=True)
class VerifiedToken:
    identity: Identity            # source: "token:<jti>"
    audiences: tuple[str, ...]
    jti: str
    issued_at: float
    expires_at: float


class TokenVerifier:
    """Verify tokens against a JWKS; each distinct token costs one signature check until it expires.

    `revoked` is any container of token ids, checked on every call (cached tokens included);
    replace it when the revocation sources change.
    """

    def __init__(self, jwks: Mapping[str, Any], issuer: str, algorithms: Iterable[str] = SUPPORTED_ALGORITHMS,
                 revoked: Container[str] = frozenset(), *, cache_size: int = 10_000,
                 project_namespace_prefix: str = DEFAULT_PROJECT_NAMESPACE_PREFIX) -> None:
        self.algorithms = frozenset(algorithms)
        unsupported = self.algorithms - set(SUPPORTED_ALGORITHMS)
        if unsupported:  # never "none" or a shared-secret algorithm
            raise ValueError(f"token algorithms {sorted(unsupported)} are not allowed; "
                             f"use {', '.join(SUPPORTED_ALGORITHMS)}")
        self.issuer = issuer
        self.revoked = revoked
        self._prefix = project_namespace_prefix
        self._cache_size = cache_size
        self._cache: dict[str, VerifiedToken] = {}
        self._keys: dict[str, jwt.PyJWK] = {}
        self.set_jwks(jwks)

    def set_jwks(self, jwks: Mapping[str, Any]) -> None:
        keys = {}
        for entry in jwks.get("keys", ()):
            if entry.get("alg") in self.algorithms and isinstance(entry.get("kid"), str):
                keys[entry["kid"]] = jwt.PyJWK(dict(entry))
        self._keys = keys
        self._cache.clear()

    def verify(self, token: str, audience: str | None, now: float | None = None) -> VerifiedToken:
        """The verified token for a request to cluster `audience` (None: any cluster); raises TokenError."""
        now = time.time() if now is None else now
        verified = self._cache.get(token)
        if verified is None:
            verified = self._verify_uncached(token)
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]  # the oldest entry
            self._cache[token] = verified
        if now >= verified.expires_at:
            self._cache.pop(token, None)
            raise TokenError("token has expired")
        if verified.jti in self.revoked:
            raise TokenError("token has been revoked")
        if audience is not None and audience not in verified.audiences:
            raise TokenError(f"token is not valid for cluster {audience!r}")
        return verified

    def _verify_uncached(self, token: str) -> VerifiedToken:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("token is malformed") from None
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            raise TokenError(f"token algorithm {algorithm!r} is not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TokenError("token header has no key id")
        key = self._keys.get(kid)
        if key is None:
            raise TokenError(f"token key id {kid!r} is unknown")
        if key.algorithm_name != algorithm:
            raise TokenError(f"token algorithm {algorithm!r} does not match its key")
        try:
            # Only the signature here; the claims are checked below, the same way for every token.
            claims = jwt.decode(token, key.key, algorithms=[algorithm], options={
                "verify_exp": False, "verify_nbf": False, "verify_iat": False, "verify_aud": False,
                "verify_iss": False, "verify_sub": False, "verify_jti": False})
        except jwt.InvalidSignatureError:
            raise TokenError("token signature is invalid") from None
        except jwt.PyJWTError:
            raise TokenError("token is malformed") from None
        return self._checked(claims)

    def _checked(self, claims: dict[str, Any]) -> VerifiedToken:
        for name, kind in (("iss", str), ("sub", str), ("jti", str), ("iat", (int, float)), ("exp", (int, float))):
            if not isinstance(claims.get(name), kind) or isinstance(claims[name], bool):
                raise TokenError(f"token claim {name!r} is missing or invalid")
        if claims["iss"] != self.issuer:
            raise TokenError(f"token issuer {claims['iss']!r} is not trusted")
        audiences = claims.get("aud")
        audiences = [audiences] if isinstance(audiences, str) else audiences
        groups = claims.get("groups", [])
        if not isinstance(audiences, list) or not all(isinstance(item, str) for item in audiences):
            raise TokenError("token claim 'aud' is missing or invalid")
        if not isinstance(groups, list) or not all(isinstance(item, str) for item in groups):
            raise TokenError("token claim 'groups' is invalid")
        try:
            scope = None if claims.get("scope") is None else load_scope(
                claims["scope"], project_namespace_prefix=self._prefix)
            identity = build_identity(claims["sub"], groups, f"token:{claims['jti']}", scope)
        except (ScopeError, StoreError) as error:
            raise TokenError(f"token claims are unusable: {error}") from None
        return VerifiedToken(identity, tuple(audiences), claims["jti"], claims["iat"], claims["exp"])


class RevocationList:
    """Revoked token ids from a file (one per line, `#` comments, or a JSON list of strings),
    read again whenever the file changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.ids: frozenset[str] = frozenset()
        self._stamp: tuple[int, int, int] | None = None
        self.reload_if_changed()

    def __contains__(self, jti: object) -> bool:
        return jti in self.ids

    def reload_if_changed(self) -> bool:
        """Re-read the file if its mtime, size or inode changed; a missing file revokes nothing.

        A file that cannot be parsed raises ValueError and leaves the previous ids in force.
        """
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            changed = self._stamp is not None
            self.ids, self._stamp = frozenset(), None
            return changed
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if stamp == self._stamp:
            return False
        text = self.path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                ids = orjson.loads(text)
            except orjson.JSONDecodeError as error:
                raise ValueError(f"revocation list {self.path}: not valid JSON: {error}") from None
            if not all(isinstance(jti, str) for jti in ids):
                raise ValueError(f"revocation list {self.path}: expected a JSON list of strings")
        else:
            ids = [line.strip() for line in text.splitlines()]
            ids = [jti for jti in ids if jti and not jti.startswith("#")]
        self.ids, self._stamp = frozenset(ids), stamp
        return True
