"""The pure part of shared watch streams: who may share, and what a joiner gets."""
from __future__ import annotations

import orjson
import pytest

from fastproxy.auth.impersonation import Check
from fastproxy.auth.requestinfo import request_info
from fastproxy.upstream_client import UpstreamRequestError
from fastproxy.watchshare import (
    AS_GATEWAY,
    EventType,
    WatchMemory,
    joiner_refusal,
    parse_event,
    review_outcome,
    shareable_watch,
    stream_identity,
    upstream_target,
)


def line(kind: str, name: str, rv: int) -> bytes:
    return orjson.dumps({"type": kind, "object": {"metadata": {"namespace": "ns", "name": name,
                                                                "resourceVersion": str(rv)}}}) + b"\n"


def bookmark(rv: int) -> bytes:
    return orjson.dumps({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": str(rv)}}}) + b"\n"


def test_per_client_parameters_do_not_split_the_key():
    a = shareable_watch("c", b"U\r\n", "/api/v1/configmaps?watch=1&resourceVersion=5&timeoutSeconds=9", None, b"1.1")
    b = shareable_watch("c", b"U\r\n", "/api/v1/configmaps?allowWatchBookmarks=true&watch=1", b"application/json",
                        b"1.1")
    assert a is not None and b is not None and a.key == b.key
    assert (a.resource_version, a.timeout, a.bookmarks) == ("5", 9, False)
    assert b.bookmarks and b.resource_version == ""
    assert upstream_target(a) == "/api/v1/configmaps?watch=1&allowWatchBookmarks=true&resourceVersion=5"


def test_identity_and_selector_split_the_key():
    base = shareable_watch("c", b"U\r\n", "/api/v1/configmaps?watch=1", None, b"1.1")
    other_user = shareable_watch("c", b"V\r\n", "/api/v1/configmaps?watch=1", None, b"1.1")
    selected = shareable_watch("c", b"U\r\n", "/api/v1/configmaps?watch=1&labelSelector=a%3Db", None, b"1.1")
    assert base is not None and other_user is not None and selected is not None
    assert len({base.key, other_user.key, selected.key}) == 3


def test_only_json_watches_over_http11_are_shared():
    target = "/api/v1/pods?watch=true"
    assert shareable_watch("c", b"", target, b"application/json;as=Table;v=v1;g=meta.k8s.io", b"1.1") is None
    assert shareable_watch("c", b"", target, b"application/vnd.kubernetes.protobuf", b"1.1") is None
    assert shareable_watch("c", b"", target, None, b"1.0") is None
    assert shareable_watch("c", b"", "/api/v1/pods?watch=false", None, b"1.1") is None
    assert shareable_watch("c", b"", target + "&resourceVersion=abc", None, b"1.1") is None
    assert shareable_watch("c", b"", target + "&timeoutSeconds=x", None, b"1.1") is None


def test_a_joiner_without_version_gets_the_current_objects_as_added():
    memory = WatchMemory("")
    for raw in (line("ADDED", "a", 3), line("ADDED", "b", 4), line("MODIFIED", "a", 7), line("DELETED", "b", 8),
                line("ADDED", "c", 9)):
        memory.record(parse_event(raw))
    chunks = memory.catch_up("", bookmarks=False)
    assert chunks is not None
    events = [orjson.loads(chunk.split(b"\r\n")[1]) for chunk in chunks]
    assert [(e["type"], e["object"]["metadata"]["name"], e["object"]["metadata"]["resourceVersion"])
            for e in events] == [("ADDED", "a", "7"), ("ADDED", "c", "9")]
    assert memory.catch_up("0", bookmarks=False) is not None
    # Before a bookmark the initial burst's versions are unordered: no version can be resumed.
    assert memory.catch_up("7", bookmarks=False) is None


def test_a_joiner_with_a_version_in_the_window_gets_exactly_what_followed():
    memory = WatchMemory("10", window=3)
    raws = [line("MODIFIED", "a", 11), bookmark(12), line("MODIFIED", "a", 13), line("ADDED", "b", 14)]
    for raw in raws:
        memory.record(parse_event(raw))
    assert memory.catch_up("", bookmarks=False) is None  # began at a version: the full set is unknown
    assert memory.catch_up("11", bookmarks=True) == [parse_event(r).chunk for r in raws[1:]]
    assert memory.catch_up("11", bookmarks=False) == [parse_event(r).chunk for r in raws[2:]]
    assert memory.catch_up("14", bookmarks=False) == []
    assert memory.catch_up("10", bookmarks=False) is None  # trimmed out of the window
    assert memory.catch_up("15", bookmarks=False) is None  # not reached yet


def test_a_bookmark_anchors_a_stream_begun_without_version():
    memory = WatchMemory("")
    for raw in (line("ADDED", "a", 30), line("ADDED", "b", 20), bookmark(40), line("MODIFIED", "b", 41)):
        memory.record(parse_event(raw))
    assert memory.catch_up("40", bookmarks=False) == [parse_event(line("MODIFIED", "b", 41)).chunk]
    assert memory.catch_up("30", bookmarks=False) is None


def test_an_error_closes_the_stream_to_joiners():
    memory = WatchMemory("")
    event = parse_event(orjson.dumps({"type": "ERROR", "object": {"kind": "Status", "code": 410}}) + b"\n")
    assert event.type is EventType.ERROR
    memory.record(event)
    assert memory.catch_up("", bookmarks=False) is None


def error_line(code: int) -> bytes:
    return orjson.dumps({"type": "ERROR", "object": {"kind": "Status", "code": code, "message": "too old"}}) + b"\n"


def test_a_version_answered_gone_at_once_is_remembered_for_joiners_at_it():
    memory = WatchMemory("5")
    memory.record(parse_event(error_line(410)))
    assert memory.gone == parse_event(error_line(410)).chunk


@pytest.mark.parametrize("start,before,code", [
    ("5", [line("MODIFIED", "a", 6)], 410),  # the stream had moved on: its later 410 is not about 5
    ("5", [], 500),                          # not an expiry: it may pass
    ("", [], 410),                           # a stream begun without a version expires no version
])
def test_other_errors_are_not_remembered(start, before, code):
    memory = WatchMemory(start)
    for raw in before:
        memory.record(parse_event(raw))
    memory.record(parse_event(error_line(code)))
    assert memory.failed and memory.gone is None


def watch_of(lines: bytes, target: str, across: bool):
    path, _, query = target.partition("?")
    identity, checks = stream_identity(across, lines, request_info("GET", path, query))
    return shareable_watch("c", identity, target, None, b"1.1"), checks


def test_identities_share_a_key_only_where_the_cluster_shares_across_them():
    target = "/api/v1/namespaces/team-a/configmaps?watch=1"
    (alice, alice_checks), (bob, _) = watch_of(b"A\r\n", target, False), watch_of(b"B\r\n", target, False)
    assert alice is not None and bob is not None and alice.key != bob.key and alice_checks == ()
    (alice, alice_checks), (bob, bob_checks) = watch_of(b"A\r\n", target, True), watch_of(b"B\r\n", target, True)
    assert alice is not None and bob is not None and alice.key == bob.key and alice.key[1] == AS_GATEWAY
    assert alice_checks == bob_checks == (Check("", "configmaps", "", "team-a", "", "watch"),
                                          Check("", "configmaps", "", "team-a", "", "list"))
    # An identity's own stream is never one run as the gateway.
    own, _ = watch_of(b"A\r\n", target, False)
    assert own is not None and own.key != alice.key


def test_the_reviews_name_the_group_the_cluster_scope_and_a_selected_name():
    _, checks = watch_of(b"A\r\n", "/apis/apps/v1/deployments?watch=true&fieldSelector=metadata.name%3Dweb", True)
    assert checks == (Check("apps", "deployments", "", "", "web", "watch"), Check("apps", "deployments", "", "", "web", "list"))


@pytest.mark.parametrize("target", [
    "/api/v1/namespaces/team-a/pods/web/log?follow=true&watch=1",  # one object's subresource
    "/api/v1/namespaces/team-a/configmaps/app?watch=1",          # a GET of one object
    "/healthz?watch=1",                                          # not a resource
])
def test_what_a_review_cannot_name_keeps_its_own_identity(target):
    path, _, query = target.partition("?")
    assert stream_identity(True, b"A\r\n", request_info("GET", path, query)) == (b"A\r\n", ())


WATCH = Check("", "configmaps", "", "team-b", "", "watch")
LIST = Check("", "configmaps", "", "team-b", "", "list")


def test_a_joiner_is_admitted_only_when_every_review_allows():
    assert joiner_refusal("viewer", (WATCH, LIST), [(True, ""), (True, "")], "demo") is None
    denied = joiner_refusal("viewer", (WATCH, LIST), [(True, ""), (False, "no binding")], "demo")
    assert denied is not None and denied.code == 403 and denied.reason == "Forbidden"
    assert denied.message == ('configmaps is forbidden: User "viewer" cannot list resource "configmaps" in API group "" '
                              'in the namespace "team-b": no binding')
    assert denied.details == {"kind": "configmaps"}
    named = Check("apps", "deployments", "", "", "web", "watch")
    denied = joiner_refusal("viewer", (named,), [(False, "")], "demo")
    assert denied is not None and denied.message == (
        'deployments.apps "web" is forbidden: User "viewer" cannot watch resource "deployments" in API group "apps" '
        "at the cluster scope")
    assert denied.details == {"kind": "deployments", "group": "apps", "name": "web"}


def test_a_review_without_an_answer_refuses_the_joiner():
    unreachable = joiner_refusal("viewer", (WATCH, LIST), [UpstreamRequestError(503, "refused"), (True, "")], "demo")
    assert unreachable is not None and unreachable.code == 503
    assert unreachable.message == "whether user 'viewer' may watch configmaps cannot be checked on cluster 'demo': refused"
    garbled = joiner_refusal("viewer", (WATCH, LIST), [(True, ""), ValueError("no status")], "demo")
    assert garbled is not None and garbled.code == 403 and garbled.message.endswith(": no status")


def test_the_metrics_count_a_joiner_once_by_how_its_reviews_ended():
    assert review_outcome([(True, ""), (True, "")]) == "allowed"
    assert review_outcome([(True, ""), (False, "no binding")]) == "refused"
    assert review_outcome([(False, "no binding"), UpstreamRequestError(503, "refused")]) == "failed"


class Clock:
    """The one part of an event loop WatchStreams.remember_gone reads."""

    def __init__(self):
        self.now = 100.0

    def time(self) -> float:
        return self.now


def test_the_versions_answered_gone_are_kept_briefly_and_boundedly(monkeypatch):
    from fastproxy import watchstream
    monkeypatch.setattr(watchstream, "GONE_KEPT", 3)
    clock = Clock()
    streams = watchstream.WatchStreams(clock)  # type: ignore[arg-type]
    key = ("c", AS_GATEWAY, "/api/v1/configmaps", "watch=1")
    for version in ("1", "2", "3", "4"):
        streams.remember_gone(key, version, b"error " + version.encode())
    assert [version for (_, version) in streams.gone] == ["2", "3", "4"]  # the oldest went
    clock.now += watchstream.GONE_SECONDS
    streams.remember_gone(key, "5", b"error 5")
    assert [version for (_, version) in streams.gone] == ["5"]  # the others had expired
