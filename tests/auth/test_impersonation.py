"""Nested impersonation: reading Impersonate-* as the API server does, the reviews it needs, the
headers sent upstream, the answers, and the reviewer's cache."""
from __future__ import annotations

import asyncio

import orjson
import pytest

from fastproxy.auth import impersonation
from fastproxy.auth.identity import Identity, escape_extra_key
from fastproxy.auth.impersonation import (
    Check,
    ImpersonationReviewer,
    NestedIdentity,
    parse_impersonation,
    review_answer,
    review_body,
)
from fastproxy.status import StatusError
from fastproxy.upstream_client import UpstreamRequestError

ALICE = Identity("alice", ("dev",), "alice-key", b"")


def parse(*pairs):
    return parse_impersonation([(name.lower().encode(), value.encode()) for name, value in pairs])


def test_everything_requested_is_read():
    nested = parse(("Impersonate-User", "bob"), ("Impersonate-Group", "a"), ("Impersonate-Group", "b"),
                   ("Impersonate-Group", "a"), ("Impersonate-Uid", "u-1"), ("Impersonate-Extra-Scopes", "read"),
                   ("Impersonate-Extra-scopes", "write"), ("Impersonate-Extra-Acme.io%2FTeam", "blue"))
    assert nested == NestedIdentity("bob", ("a", "b"), "u-1", (("acme.io/team", ("blue",)),
                                                               ("scopes", ("read", "write"))))
    assert nested.checks() == (
        Check("", "users", "", "", "bob"), Check("", "groups", "", "", "a"), Check("", "groups", "", "", "b"),
        Check("authentication.k8s.io", "userextras", "acme.io/team", "", "blue"),
        Check("authentication.k8s.io", "userextras", "scopes", "", "read"),
        Check("authentication.k8s.io", "userextras", "scopes", "", "write"),
        Check("authentication.k8s.io", "uids", "", "", "u-1"))
    assert nested.headers() == (
        b"Impersonate-User: bob\r\nImpersonate-Group: a\r\nImpersonate-Group: b\r\nImpersonate-Uid: u-1\r\n"
        b"Impersonate-Extra-acme.io%2Fteam: blue\r\nImpersonate-Extra-scopes: read\r\n"
        b"Impersonate-Extra-scopes: write\r\n")


def test_a_service_account_is_checked_as_one():
    assert parse(("Impersonate-User", "system:serviceaccount:kube-system:builder")).checks() == (
        Check("", "serviceaccounts", "", "kube-system", "builder"),)
    assert parse(("Impersonate-User", "system:serviceaccount:odd")).checks() == (
        Check("", "users", "", "", "system:serviceaccount:odd"),)


@pytest.mark.parametrize("key,escaped", [
    ("scopes", b"scopes"), ("acme.io/team", b"acme.io%2Fteam"), ("100%", b"100%25"), ("a b", b"a%20b"),
    ("ünï", b"%C3%BCn%C3%AF"), ("x_y-z.~!", b"x_y-z.~!"),
])
def test_extra_keys_are_escaped_as_client_go_escapes_them(key, escaped):
    assert escape_extra_key(key) == escaped
    assert parse(("Impersonate-User", "u"), ("Impersonate-Extra-" + escaped.decode(), "v")).extra == ((key, ("v",)),)


@pytest.mark.parametrize("pairs,message", [
    ([("Impersonate-Group", "g")], "Impersonate-Group, Impersonate-Uid and Impersonate-Extra-* need Impersonate-User"),
    ([("Impersonate-User", "a"), ("Impersonate-User", "b")], "more than one Impersonate-User header"),
    ([("Impersonate-User", "a"), ("Impersonate-Uid", "1"), ("Impersonate-Uid", "2")],
     "more than one Impersonate-Uid header"),
    ([("Impersonate-User", "a"), ("Impersonate-Role", "admin")], "unknown impersonation header 'impersonate-role'"),
    ([("Impersonate-User", "a"), ("Impersonate-Extra-", "v")], "unknown impersonation header 'impersonate-extra-'"),
    ([("Impersonate-User", "a"), ("Impersonate-Extra-a%zz", "v")],
     "header impersonate-extra-a%zz has an invalid percent-escape"),
    ([("Impersonate-User", "a"), ("Impersonate-Extra-a%ff", "v")], "header impersonate-extra-a%ff does not decode to UTF-8"),
    ([("Impersonate-User", "")], "header impersonate-user must hold a non-empty UTF-8 name without control "
                                 "characters or surrounding spaces"),
    ([("Impersonate-User", "a\x01b")], "header impersonate-user must hold a non-empty UTF-8 name without control "
                                       "characters or surrounding spaces"),
])
def test_what_the_api_server_would_refuse_or_read_ambiguously_is_400(pairs, message):
    with pytest.raises(StatusError) as caught:
        parse(*pairs)
    assert (caught.value.code, caught.value.message) == (400, message)


def test_a_value_that_is_not_utf8_is_400():
    with pytest.raises(StatusError):
        parse_impersonation([(b"impersonate-user", b"\xff")])


def test_review_body_asks_for_the_identity_as_the_cluster_will_see_it():
    body = orjson.loads(review_body(ALICE, Check("authentication.k8s.io", "userextras", "scopes", "", "read")))
    assert body == {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                    "spec": {"user": "alice", "groups": ["dev", "system:authenticated"],
                             "resourceAttributes": {"verb": "impersonate", "group": "authentication.k8s.io",
                                                    "resource": "userextras", "subresource": "scopes",
                                                    "name": "read"}}}
    already = Identity("bob", ("system:authenticated", "x"), "k", b"")
    assert orjson.loads(review_body(already, Check("", "users", "", "", "u")))["spec"]["groups"] == [
        "system:authenticated", "x"]


def test_review_body_asks_for_a_nested_identity_whole():
    nested = NestedIdentity("bob", ("a",), "u-1", (("scopes", ("read", "write")),))
    spec = orjson.loads(review_body(nested, Check("", "configmaps", "", "team-a", "", "watch")))["spec"]
    assert spec == {"user": "bob", "groups": ["a", "system:authenticated"], "uid": "u-1",
                    "extra": {"scopes": ["read", "write"]},
                    "resourceAttributes": {"verb": "watch", "group": "", "resource": "configmaps",
                                           "namespace": "team-a"}}


@pytest.mark.parametrize("status,answer,result", [
    (201, {"status": {"allowed": True}}, (True, "")),
    (200, {"status": {"allowed": False, "reason": "no"}}, (False, "no")),
    (201, {"status": {"allowed": True, "denied": True}}, (False, "")),
    (201, {"status": {"allowed": "yes"}}, (False, "")),
    (201, {"status": {}}, (False, "")),
])
def test_review_answers(status, answer, result):
    assert review_answer(status, orjson.dumps(answer)) == result


@pytest.mark.parametrize("status,body,message", [
    (403, b'{"kind":"Status","message":"cannot create subjectaccessreviews"}',
     "the SubjectAccessReview was answered with HTTP 403: cannot create subjectaccessreviews"),
    (404, b"not found", "the SubjectAccessReview was answered with HTTP 404"),
    (201, b"{}", "the SubjectAccessReview answer has no status"),
    (201, b"[]", "the SubjectAccessReview answer has no status"),
])
def test_no_answer_is_an_error(status, body, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        review_answer(status, body)


class FakeUpstream:
    class cluster:
        name = "prod"


def test_reviewer_shares_and_caches_answers(monkeypatch):
    asked = []

    async def fake_request(upstream, method, path, body, headers, limit):
        asked.append(orjson.loads(body)["spec"]["resourceAttributes"]["name"])
        await asyncio.sleep(0.01)
        name = asked[-1]
        if name == "fails":
            raise UpstreamRequestError(503, 'cluster "prod" is unreachable: refused')
        return 201, orjson.dumps({"status": {"allowed": name.startswith("ok-")}})
    monkeypatch.setattr(impersonation, "request", fake_request)

    async def main():
        reviewer = ImpersonationReviewer(ttl=10)
        both = await asyncio.gather(*(reviewer.refusal(FakeUpstream, ALICE, NestedIdentity("ok-1", ("ok-g",)))
                                      for _ in range(5)))
        assert both == [None] * 5 and sorted(asked) == ["ok-1", "ok-g"]  # five requests, one review each
        denied = await reviewer.refusal(FakeUpstream, ALICE, NestedIdentity("ok-1", ("admins",)))
        assert denied.code == 403 and denied.message == "user 'alice' may not impersonate groups 'admins' on cluster 'prod'"
        failed = await reviewer.refusal(FakeUpstream, ALICE, NestedIdentity("fails"))
        assert failed.message == ("impersonation cannot be checked on cluster 'prod': "
                                  'cluster "prod" is unreachable: refused')
        await reviewer.refusal(FakeUpstream, ALICE, NestedIdentity("fails"))
        assert asked.count("fails") == 2  # failures are not remembered
        assert asked.count("admins") == 1

        other = Identity("alice", ("dev", "ops"), "other-key", b"")
        await reviewer.refusal(FakeUpstream, other, NestedIdentity("ok-1"))
        assert asked.count("ok-1") == 2  # answers are per identity, groups included

        short = ImpersonationReviewer(ttl=0.05, max_entries=2)
        for name in ("ok-a", "ok-b", "ok-c", "ok-a"):
            await short.refusal(FakeUpstream, ALICE, NestedIdentity(name))
        assert len(short._answers) <= 2 and asked.count("ok-a") == 2  # bounded: the oldest went
        await asyncio.sleep(0.06)
        await short.refusal(FakeUpstream, ALICE, NestedIdentity("ok-c"))
        assert asked.count("ok-c") == 2  # expired
    asyncio.run(main())
