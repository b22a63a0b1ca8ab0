"""The management API's pure parts, without sockets: bodies, scope narrowing, snapshot diffs, watch history."""
from __future__ import annotations

import pytest

from fastproxy.auth.scopes import covers
from fastproxy.management import body, objects
from fastproxy.management.api import token_audiences
from fastproxy.management.watch import Event, EventLog, WatchStream
from fastproxy.status import StatusError
from fastproxy.store import AccessKey, Snapshot, Team, User, VirtualClusterInstance


def test_yaml_bodies_load_safely():
    assert body.decode_object(b"kind: User\nspec: {groups: [a, b]}\n", "application/yaml; charset=utf-8") == {
        "kind": "User", "spec": {"groups": ["a", "b"]}}
    for hostile, says in ((b"a: &x [1]\nb: *x\n", "aliases"), (b"!!python/object/apply:os.system [id]\n", "not valid YAML"),
                          (b"- a\n- b\n", "must be an object"), (b"", "empty"), (b"a: [\n", "not valid YAML")):
        with pytest.raises(StatusError) as refused:
            body.decode_object(hostile, "application/yaml")
        assert refused.value.code == 400 and says in refused.value.message


def test_json_bodies_and_media_types():
    assert body.decode_object(b'{"a": 1}', "") == {"a": 1}
    with pytest.raises(StatusError) as deep:
        body.decode_object(b"[" * 5000 + b"]" * 5000, "application/json")
    assert deep.value.code == 400
    with pytest.raises(StatusError) as media:
        body.decode_object(b"<a/>", "text/xml")
    assert media.value.code == 415
    assert body.decode_patch(b'{"spec": {}}', "application/merge-patch+json") == ("application/merge-patch+json", {"spec": {}})
    with pytest.raises(StatusError) as apply:
        body.decode_patch(b"{}", "application/apply-patch+yaml")
    assert apply.value.code == 415 and "server-side apply" in apply.value.message
    assert body.decode_options(b"  ", "application/json") == {}


@pytest.mark.parametrize(("limit", "wanted", "covered"), [
    ({"clusters": [{"cluster": "prod"}]}, {"clusters": [{"cluster": "prod"}]}, True),
    ({"clusters": [{"cluster": "prod"}]}, {"clusters": [{"cluster": "prod"}, {"cluster": "dev"}]}, False),
    ({"clusters": [{"cluster": "*"}]}, {"clusters": [{"cluster": "dev"}]}, True),
    ({"clusters": [{"cluster": "prod"}]}, {"clusters": [{"cluster": "*"}]}, False),
    ({"clusters": [{"cluster": "prod"}]}, {}, True),
    ({"clusters": [{"cluster": "prod"}]}, {"rules": [{"verbs": ["get"]}]}, False),
    ({"rules": [{"verbs": ["get"], "cluster": "prod"}]}, {"rules": [{"verbs": ["get"], "cluster": "prod"}]}, True),
    ({"rules": [{"verbs": ["get"]}]}, {"rules": [{"verbs": ["get", "delete"]}]}, False),
    ({}, {"allowLoftCli": True}, False),
    ({"allowLoftCli": True}, {"allowLoftCli": True}, True),
    ({"roles": [{"role": "loft-cli"}]}, {"roles": [{"role": "agent"}]}, False),
])
def test_a_scope_covers_only_what_its_own_grants_hold(limit, wanted, covered):
    assert covers(limit, wanted) is covered


def test_token_audiences_follow_the_scope():
    assert token_audiences(None, ["b", "a"]) == ["a", "b"]
    assert token_audiences({"clusters": [{"cluster": "a"}]}, ["a", "b"]) == ["a"]
    assert token_audiences({"clusters": [{"cluster": "*"}]}, ["a", "b"]) == ["a", "b"]


def snapshot(version, users=(), teams=(), keys=(), instances=()):
    return Snapshot(version, 0.0, 0.0, {}, {user.name: user for user in users}, {team.name: team for team in teams},
                    frozenset(), access_keys={key.name: key for key in keys},
                    virtual_cluster_instances={(i.namespace, i.name): i for i in instances})


def READY(instance):
    return ("Ready", "")


def test_snapshot_diffs_become_watch_events():
    jane = User("jane", "jane", email="jane@example.com", uid="u1", resource_version=3)
    key = AccessKey("jane-k", "User", "jane", None, b"d" * 32, uid="k1", resource_version=4)
    old = snapshot(4, users=[jane], keys=[key])
    renamed = User("jane", "jane", email="j@example.com", uid="u1", resource_version=5)
    team = Team("devs", ("jane",), uid="t1", resource_version=6)
    used = AccessKey("jane-k", "User", "jane", None, b"d" * 32, uid="k1", resource_version=4, last_activity=99.0)
    new = snapshot(6, users=[renamed], teams=[team], keys=[used])
    events = objects.snapshot_events(old, new, READY)
    assert [(e.type, e.resource, e.object["metadata"]["name"]) for e in events] == [
        ("MODIFIED", "users", "jane"), ("ADDED", "teams", "devs")]  # key activity alone is no change
    assert events[0].object["spec"]["email"] == "j@example.com" and events[0].object["status"]["teams"] == ["devs"]
    instance = VirtualClusterInstance("team-a", "vc1", "prod", token="secret", resource_version=6)
    added = objects.snapshot_events(new, snapshot(6, users=[renamed], teams=[team], keys=[used], instances=[instance]),
                                    lambda obj: ("Shadowed", "configured"))
    assert [(e.type, e.resource, e.object["metadata"]["namespace"], e.object["status"]["phase"]) for e in added] == [
        ("ADDED", "virtualclusterinstances", "team-a", "Shadowed")]
    assert "secret" not in str(added[0].object)
    gone = objects.snapshot_events(new, snapshot(7, teams=[team]), READY)
    assert [(e.type, e.resource, e.object["metadata"]["resourceVersion"]) for e in gone] == [
        ("DELETED", "users", "7"), ("DELETED", "ownedaccesskeys", "7")]


class Collected:
    def __init__(self):
        self.chunks, self.ended, self.size = [], False, 0

    def send_chunk(self, data):
        self.chunks.append(data)

    def end_stream(self):
        self.ended = True

    def buffered(self):
        return self.size


def event(version, name, kind="ADDED"):
    return Event(version, kind, "users", {"metadata": {"name": name}})


def test_event_log_replays_what_it_holds_and_refuses_what_it_dropped():
    log = EventLog(10, capacity=3)
    log.append([event(11, "a"), event(12, "b")], 12)
    assert [e.object["metadata"]["name"] for e in log.since(11, "users")] == ["b"]
    assert log.since(9, "users") is None  # older than the log's start: a relist is needed
    log.append([event(13, "c"), event(14, "d")], 14)
    assert log.oldest == 11 and log.since(10, "users") is None
    assert [e.version for e in log.since(11, "users")] == [12, 13, 14]
    assert log.since(11, "teams") == []


def test_a_watch_streams_what_it_admits_and_ends_a_slow_client():
    log = EventLog(0)
    out = Collected()
    watch = WatchStream(log, out, "users", lambda obj: obj["metadata"]["name"] != "hidden", lambda obj: obj,
                        kind="User", bookmarks=True, timeout=60)
    watch.start([event(1, "a")])
    log.append([event(2, "hidden"), event(2, "b", "MODIFIED")], 2)
    assert [chunk.count(b"\n") for chunk in out.chunks] == [1, 1] and b'"MODIFIED"' in out.chunks[1]
    watch.tick(watch.next_bookmark)
    assert b'"BOOKMARK"' in out.chunks[-1] and b'"resourceVersion":"2"' in out.chunks[-1]
    out.size = 10 ** 9  # the client stopped reading
    log.append([event(3, "c")], 3)
    assert out.ended and watch not in log.watches
    later = Collected()
    brief = WatchStream(log, later, "users", lambda obj: True, lambda obj: obj, kind="User", bookmarks=False, timeout=0)
    brief.start([])
    brief.tick(brief.ends_at)
    assert later.ended
