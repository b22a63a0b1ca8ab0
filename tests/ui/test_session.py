"""The status page's session cookie, sign-in form body and CSRF check: pure, no sockets."""
from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fastproxy.ui import session


def test_a_sealed_key_opens_until_it_expires():
    value = session.seal(b"fpk-secret", expires=1000.0)
    assert b"fpk-secret" not in value.encode() and "fpk" not in value
    assert session.unseal(value, now=999.0) == (b"fpk-secret", False)
    assert session.unseal(value, now=1000.0) is None


def test_a_key_the_page_made_is_marked_so_and_the_mark_cannot_be_changed():
    made = session.seal(b"fpk-login", expires=1000.0, made_here=True)
    assert session.unseal(made, now=1.0) == (b"fpk-login", True)
    raw = bytearray(base64.urlsafe_b64decode(made + "=" * (-len(made) % 4)))
    raw[12 + 8] ^= 1  # the flag's byte under the cipher: the tag no longer matches
    assert session.unseal(base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("="), now=1.0) is None


def test_two_seals_of_one_key_differ():
    assert session.seal(b"k", 10.0) != session.seal(b"k", 10.0)


@pytest.mark.parametrize("damage", [
    lambda v: v[:-2] + ("A" if v[-2] != "A" else "B") + v[-1],  # a changed byte
    lambda v: v[:20],                                            # cut short
    lambda v: "!!!" + v,                                         # not base64
    lambda v: "",
])
def test_a_damaged_cookie_opens_to_nothing(damage):
    assert session.unseal(damage(session.seal(b"fpk-secret", 1e12)), now=1.0) is None


def test_a_cookie_sealed_under_another_secret_opens_to_nothing():
    other = AESGCM(AESGCM.generate_key(bit_length=256))  # another run of the service
    assert session.unseal(session.seal(b"fpk-secret", 1e12, aead=other), now=1.0) is None


def test_the_cookie_is_http_only_strict_and_secure_with_tls():
    assert session.set_cookie("v", 60, secure=True) == b"fastproxy_ui=v; Path=/ui/; Max-Age=60; HttpOnly; SameSite=Strict; Secure"
    assert not session.set_cookie("v", 60, secure=False).endswith(b"Secure")


def test_the_session_cookie_is_found_among_others():
    assert session.cookie_value([b"a=1; fastproxy_ui=abc; b=2"]) == "abc"
    assert session.cookie_value([b"a=1", b"fastproxy_ui=xyz"]) == "xyz"
    assert session.cookie_value([b"fastproxy_uix=1; a"]) is None


@pytest.mark.parametrize("body, key", [
    (b"key=fpk-abc", b"fpk-abc"),
    (b"key=fpk%2Babc%3D", b"fpk+abc="),
    (b"key=+fpk-abc+", b"fpk-abc"),  # pasted with spaces
    (b"key=", None),
    (b"other=1", None),
    (b"key=a&key=b", None),          # ambiguous: refused
    (b"\xff\xfe", None),
])
def test_the_form_key(body, key):
    assert session.form_fields(body).key == key


@pytest.mark.parametrize("body, username, password", [
    (b"username=alice&password=p%C3%A4ss+word+", "alice", "p\u00e4ss word "),  # a password is kept as typed
    (b"username=+alice+&password=x", "alice", "x"),
    (b"username=alice&password=", "alice", None),
    (b"username=alice&username=bob&password=x", None, "x"),
    (b"password=x", None, "x"),
    (b"key=fpk-abc", None, None),
])
def test_the_form_user_name_and_password(body, username, password):
    form = session.form_fields(body)
    assert (form.username, form.password) == (username, password)


def test_only_a_post_from_this_gateway_passes_the_origin_check():
    assert session.same_origin(b"https://gw:8443", b"gw:8443", tls=True)
    assert not session.same_origin(b"http://gw:8443", b"gw:8443", tls=True)
    assert not session.same_origin(b"https://evil.example", b"gw:8443", tls=True)
    assert not session.same_origin(b"null", b"gw:8443", tls=True)
    assert not session.same_origin(None, b"gw:8443", tls=True)
    assert session.same_origin(b"http://gw", b"gw", tls=False)
