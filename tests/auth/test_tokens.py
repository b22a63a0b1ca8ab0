"""Direct Cluster Endpoint tokens: keys, issuing, and every hostile token refused with its exact error."""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
import time

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import RSAAlgorithm

from fastproxy.auth import tokens
from fastproxy.auth.requestinfo import request_info
from fastproxy.auth.scopes import check_scope
from fastproxy.auth.tokens import KeySet, RevocationList, TokenError, TokenVerifier, issue_token, thumbprint

ISSUER = "https://gateway.example"
NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def keyset(tmp_path_factory):
    return KeySet(tmp_path_factory.mktemp("keys"), max_token_lifetime=3600)


@pytest.fixture
def verifier(keyset):
    return TokenVerifier(keyset.jwks(), ISSUER)


def token_for(keyset, **overrides):
    arguments = dict(issuer=ISSUER, subject="alice", audience="prod", groups=["devs", "system:authenticated"],
                     ttl=600, now=NOW)
    arguments.update(overrides)
    return issue_token(keyset, **arguments)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_parts(token):
    header, payload, _ = token.split(".")
    pad = lambda text: text + "=" * (-len(text) % 4)  # noqa: E731
    return orjson.loads(base64.urlsafe_b64decode(pad(header))), orjson.loads(base64.urlsafe_b64decode(pad(payload)))


# ---- keys ----

def test_kid_is_the_rfc7638_thumbprint():
    # The example key and thumbprint of RFC 7638, section 3.1.
    public_key = RSAAlgorithm.from_jwk({"kty": "RSA", "e": "AQAB", "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3"
        "oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdA"
        "ZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-"
        "kEgU8awapJzKnqDKgw")})
    assert thumbprint(public_key) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_first_use_creates_a_key_that_persists(tmp_path):
    first = KeySet(tmp_path / "keys")
    files = os.listdir(tmp_path / "keys")
    pem = [name for name in files if name.endswith(".key.pem")]
    assert len(pem) == 1 and pem[0].endswith(".RS256.key.pem")
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / pem[0]).st_mode) == 0o600
    assert KeySet(tmp_path / "keys").active.kid == first.active.kid
    assert first.active.kid == thumbprint(first.active.public_key)


def test_jwks_publishes_public_keys_only(keyset):
    (jwk,) = keyset.jwks()["keys"]
    assert set(jwk) == {"kty", "n", "e", "kid", "use", "alg"}
    assert (jwk["kty"], jwk["alg"], jwk["use"], jwk["kid"]) == ("RSA", "RS256", "sig", keyset.active.kid)


def test_rotation_keeps_old_public_keys_until_their_tokens_expire(tmp_path):
    keys = KeySet(tmp_path, algorithm="ES256", max_token_lifetime=3600, now=NOW)
    old_token = token_for(keys, ttl=3600)
    old_kid = keys.active.kid
    keys.rotate(algorithm="RS256", now=NOW + 10)
    assert keys.active.algorithm == "RS256" and keys.active.kid != old_kid
    assert [key["kid"] for key in keys.jwks()["keys"]] == [keys.active.kid, old_kid]
    assert sorted(name.split(".", 1)[1] for name in os.listdir(tmp_path) if name.endswith(".pem")) == [
        "ES256.pub.pem", "RS256.key.pem"]
    verifier = TokenVerifier(keys.jwks(), ISSUER)
    assert verifier.verify(old_token, "prod", now=NOW + 20).jti
    assert verifier.verify(token_for(keys, now=NOW + 20), "prod", now=NOW + 30).jti

    reloaded = KeySet(tmp_path, max_token_lifetime=3600, now=NOW + 3600)  # old key's tokens may still live
    assert len(reloaded.jwks()["keys"]) == 2
    keys.rotate(now=NOW + 10 + 3601)  # every token of the first key has expired: it goes
    assert old_kid not in [key["kid"] for key in keys.jwks()["keys"]]
    assert not [name for name in os.listdir(tmp_path) if ".ES256." in name]


def test_a_rotation_cut_short_leaves_a_usable_key(tmp_path):
    keys = KeySet(tmp_path)
    (private_file,) = tmp_path.glob("*.key.pem")
    public_pem = keys.active.public_key.public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo)
    private_file.with_name(private_file.name.replace(".key.", ".pub.")).write_bytes(public_pem)
    reloaded = KeySet(tmp_path)
    assert [key.kid for key in reloaded.keys] == [keys.active.kid]
    assert reloaded.active.private_key is not None


def test_a_damaged_key_directory_is_refused(tmp_path):
    KeySet(tmp_path)
    (tmp_path / "1.RS256.pub.pem").write_text("junk")
    with pytest.raises(ValueError, match=r"^signing key .*1\.RS256\.pub\.pem: Unable to load PEM file"):
        KeySet(tmp_path)
    (tmp_path / "1.RS256.pub.pem").unlink()
    (private_file,) = tmp_path.glob("*.key.pem")
    private_file.rename(private_file.with_name(private_file.name.replace("RS256", "ES256")))
    with pytest.raises(ValueError, match=r"\.ES256\.key\.pem: holds an RS256 key$"):
        KeySet(tmp_path)


# ---- issuing ----

def test_issued_token_claims(keyset):
    token = token_for(keyset, scope={"clusters": [{"cluster": "prod"}]})
    header, claims = unsigned_parts(token)
    assert header == {"alg": "RS256", "kid": keyset.active.kid, "typ": "JWT"}
    assert set(claims) == {"iss", "sub", "aud", "iat", "exp", "jti", "groups", "scope"}
    assert (claims["iss"], claims["sub"], claims["aud"], claims["iat"], claims["exp"]) == (
        ISSUER, "alice", ["prod"], NOW, NOW + 600)
    assert claims["groups"] == ["devs", "system:authenticated"]
    assert claims["scope"] == {"clusters": [{"cluster": "prod"}]}
    assert len(claims["jti"]) >= 16 and claims["jti"] != unsigned_parts(token_for(keyset))[1]["jti"]


@pytest.mark.parametrize("overrides, message", [
    ({"ttl": 0}, "token ttl 0 must be between 1 and 3600 seconds"),
    ({"ttl": 3601}, "token ttl 3601 must be between 1 and 3600 seconds"),
    ({"subject": "alice\r\nImpersonate-Group: system:masters"}, "user 'alice\\r\\nImpersonate-Group: system:masters' "
     "must be non-empty, without CR, LF, NUL or other control characters and without leading or trailing spaces"),
    ({"groups": ["ok", "bad\x00"]}, "group 'bad\\x00' must be non-empty, without CR, LF, NUL or other control "
     "characters and without leading or trailing spaces"),
])
def test_issue_refuses_bad_requests(keyset, overrides, message):
    with pytest.raises(ValueError) as raised:
        token_for(keyset, **overrides)
    assert str(raised.value) == message


# ---- verifying ----

def test_verify_builds_the_identity(keyset, verifier):
    token = token_for(keyset, scope={"clusters": [{"cluster": "prod"}]})
    verified = verifier.verify(token, "prod", now=NOW + 1)
    identity = verified.identity
    assert (identity.user, identity.groups, identity.source) == (
        "alice", ("devs", "system:authenticated"), f"token:{verified.jti}")
    assert identity.impersonation == (b"Impersonate-User: alice\r\nImpersonate-Group: devs\r\n"
                                      b"Impersonate-Group: system:authenticated\r\n")
    assert (verified.audiences, verified.issued_at, verified.expires_at) == (("prod",), NOW, NOW + 600)
    assert check_scope(identity.scope, request_info("GET", "/api/v1/pods", ""), "Cluster", "prod") is None
    assert check_scope(identity.scope, request_info("GET", "/api/v1/pods", ""), "Cluster", "dev") is not None


def test_es256_tokens_verify(tmp_path):
    keys = KeySet(tmp_path, algorithm="ES256")
    token = token_for(keys)
    assert unsigned_parts(token)[0]["alg"] == "ES256"
    assert TokenVerifier(keys.jwks(), ISSUER).verify(token, "prod", now=NOW).identity.user == "alice"


def forge(header: dict, claims: dict, signature: bytes = b"") -> str:
    return f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(claims))}.{b64(signature)}"


def good_claims(**overrides):
    claims = {"iss": ISSUER, "sub": "admin", "aud": ["prod"], "iat": NOW, "exp": NOW + 600, "jti": "x",
              "groups": ["system:masters"]}
    claims.update(overrides)
    return claims


def test_refuses_alg_none(keyset, verifier):
    token = forge({"alg": "none", "kid": keyset.active.kid}, good_claims())
    with pytest.raises(TokenError, match=r"^token algorithm 'none' is not allowed$"):
        verifier.verify(token, "prod", now=NOW)


def test_refuses_hs256_signed_with_the_public_key(keyset, verifier):
    public_pem = keyset.active.public_key.public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{b64(orjson.dumps({'alg': 'HS256', 'kid': keyset.active.kid}))}.{b64(orjson.dumps(good_claims()))}"
    token = f"{signing_input}.{b64(hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest())}"
    with pytest.raises(TokenError, match=r"^token algorithm 'HS256' is not allowed$"):
        verifier.verify(token, "prod", now=NOW)


def test_refuses_an_expired_token(keyset, verifier):
    token = token_for(keyset, ttl=60, now=NOW - 120)
    with pytest.raises(TokenError, match=r"^token has expired$"):
        verifier.verify(token, "prod", now=NOW)


def test_refuses_the_wrong_audience(keyset, verifier):
    with pytest.raises(TokenError, match=r"^token is not valid for cluster 'dev'$"):
        verifier.verify(token_for(keyset), "dev", now=NOW)


def test_refuses_the_wrong_issuer(keyset, verifier):
    with pytest.raises(TokenError, match=r"^token issuer 'https://evil.example' is not trusted$"):
        verifier.verify(token_for(keyset, issuer="https://evil.example"), "prod", now=NOW)


def test_refuses_an_unknown_kid(tmp_path, verifier):
    stranger = KeySet(tmp_path)
    with pytest.raises(TokenError, match=rf"^token key id '{stranger.active.kid}' is unknown$"):
        verifier.verify(token_for(stranger), "prod", now=NOW)


def test_refuses_a_missing_kid(keyset, verifier):
    token = jwt.encode(good_claims(), keyset.active.private_key, algorithm="RS256")
    with pytest.raises(TokenError, match=r"^token header has no key id$"):
        verifier.verify(token, "prod", now=NOW)


def test_refuses_a_tampered_payload(keyset, verifier):
    header, _, signature = token_for(keyset).split(".")
    tampered = f"{header}.{b64(orjson.dumps(good_claims(sub='admin')))}.{signature}"
    with pytest.raises(TokenError, match=r"^token signature is invalid$"):
        verifier.verify(tampered, "prod", now=NOW)


def test_refuses_an_algorithm_other_than_its_keys(keyset, verifier):
    token = forge({"alg": "ES256", "kid": keyset.active.kid}, good_claims(), b"\x00" * 64)
    with pytest.raises(TokenError, match=r"^token algorithm 'ES256' does not match its key$"):
        verifier.verify(token, "prod", now=NOW)


def test_refuses_a_revoked_jti_even_when_cached(keyset, verifier):
    token = token_for(keyset)
    verified = verifier.verify(token, "prod", now=NOW)
    verifier.revoked = {verified.jti}
    with pytest.raises(TokenError, match=r"^token has been revoked$"):
        verifier.verify(token, "prod", now=NOW)


@pytest.mark.parametrize("token", ["", "not-a-token", "a.b.c", "e30.e30"])
def test_refuses_malformed_tokens(verifier, token):
    with pytest.raises(TokenError, match=r"^token is malformed$"):
        verifier.verify(token, "prod", now=NOW)


@pytest.mark.parametrize("claims, message", [
    (good_claims(exp=None), "token claim 'exp' is missing or invalid"),
    (good_claims(sub=7), "token claim 'sub' is missing or invalid"),
    (good_claims(aud=None), "token claim 'aud' is missing or invalid"),
    (good_claims(groups="system:masters"), "token claim 'groups' is invalid"),
    (good_claims(groups=["a\nb"]), "token claims are unusable: group 'a\\nb' must be non-empty, without CR, LF, "
     "NUL or other control characters and without leading or trailing spaces"),
    (good_claims(scope={"bogus": 1}), "token claims are unusable: scope: unknown key 'bogus'"),
])
def test_refuses_signed_tokens_with_bad_claims(keyset, verifier, claims, message):
    claims = {name: value for name, value in claims.items() if value is not None}
    token = jwt.encode(claims, keyset.active.private_key, algorithm="RS256", headers={"kid": keyset.active.kid})
    with pytest.raises(TokenError) as raised:
        verifier.verify(token, "prod", now=NOW)
    assert str(raised.value) == message


@pytest.mark.parametrize("algorithms", [("none",), ("HS256",), ("RS256", "HS512")])
def test_verifier_refuses_unsafe_algorithm_lists(keyset, algorithms):
    with pytest.raises(ValueError, match="are not allowed; use RS256, ES256"):
        TokenVerifier(keyset.jwks(), ISSUER, algorithms=algorithms)


def test_a_string_audience_is_accepted(keyset, verifier):
    token = jwt.encode(good_claims(aud="prod"), keyset.active.private_key, algorithm="RS256",
                       headers={"kid": keyset.active.kid})
    assert verifier.verify(token, "prod", now=NOW).audiences == ("prod",)


# ---- the cache ----

@pytest.fixture
def signature_checks(monkeypatch):
    calls = []
    real_decode = tokens.jwt.decode

    def counting_decode(*args, **kwargs):
        calls.append(1)
        return real_decode(*args, **kwargs)
    monkeypatch.setattr(tokens.jwt, "decode", counting_decode)
    return calls


def test_one_signature_check_per_token(keyset, verifier, signature_checks):
    token = token_for(keyset)
    for _ in range(5):
        verifier.verify(token, "prod", now=NOW)
    assert len(signature_checks) == 1
    with pytest.raises(TokenError, match="not valid for cluster 'dev'"):
        verifier.verify(token, "dev", now=NOW)  # the cache does not skip the audience check
    with pytest.raises(TokenError, match="^token has expired$"):
        verifier.verify(token, "prod", now=NOW + 600)  # nor the expiry
    assert len(signature_checks) == 1


def test_cache_is_bounded(keyset, signature_checks):
    verifier = TokenVerifier(keyset.jwks(), ISSUER, cache_size=2)
    first, second, third = (token_for(keyset) for _ in range(3))
    for token in (first, second, third):
        verifier.verify(token, "prod", now=NOW)
    verifier.verify(third, "prod", now=NOW)
    assert len(signature_checks) == 3
    verifier.verify(first, "prod", now=NOW)  # evicted: checked again
    assert len(signature_checks) == 4


def test_new_jwks_drop_the_cache(keyset, tmp_path):
    verifier = TokenVerifier(keyset.jwks(), ISSUER)
    token = token_for(keyset)
    verifier.verify(token, "prod", now=NOW)
    verifier.set_jwks(KeySet(tmp_path).jwks())
    with pytest.raises(TokenError, match="is unknown"):
        verifier.verify(token, "prod", now=NOW)


# ---- the revocation list file ----

def rewrite(path, text):
    path.write_text(text)
    later = time.time() + 5
    os.utime(path, (later, later))  # a distinct mtime even on coarse clocks


def test_revocation_list_lines_and_json(tmp_path):
    path = tmp_path / "revoked"
    revoked = RevocationList(path)
    assert revoked.ids == frozenset() and "a" not in revoked
    rewrite(path, "# revoked tokens\na\n\n  b  \n")
    assert revoked.reload_if_changed() is True
    assert revoked.ids == {"a", "b"} and "a" in revoked
    assert revoked.reload_if_changed() is False
    rewrite(path, '["c"]')
    assert revoked.reload_if_changed() and revoked.ids == {"c"}
    path.unlink()
    assert revoked.reload_if_changed() and revoked.ids == frozenset()


def test_revocation_list_keeps_old_ids_when_the_file_is_broken(tmp_path):
    path = tmp_path / "revoked.json"
    rewrite(path, '["a"]')
    revoked = RevocationList(path)
    rewrite(path, '["a", 1]')
    with pytest.raises(ValueError, match=r"revocation list .*revoked.json: expected a JSON list of strings"):
        revoked.reload_if_changed()
    assert revoked.ids == {"a"}


def test_verifier_reads_a_revocation_list(keyset, tmp_path):
    token = token_for(keyset)
    jti = unsigned_parts(token)[1]["jti"]
    path = tmp_path / "revoked"
    revoked = RevocationList(path)
    verifier = TokenVerifier(keyset.jwks(), ISSUER, revoked=revoked)
    verifier.verify(token, "prod", now=NOW)
    rewrite(path, f"{jti}\n")
    revoked.reload_if_changed()
    with pytest.raises(TokenError, match="^token has been revoked$"):
        verifier.verify(token, "prod", now=NOW)
