"""The pure part of shared watch streams: who may share, and what a joiner gets."""
from __future__ import annotations

import orjson

from fastproxy.watchshare import EventType, WatchMemory, parse_event, shareable_watch, upstream_target


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
