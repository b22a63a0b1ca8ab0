"""Sleep-mode activity: which requests count, batching, and the store round trip."""
from __future__ import annotations

import pytest

from fastproxy.auth.identity import Identity
from fastproxy.config import ActivityConfig, ConfigError, parse_config
from fastproxy.context import RequestContext, RequestHead
from fastproxy.observe.activity import ActivityObserver
from fastproxy.routing import route
from fastproxy.store.sqlite import SqliteReader, SqliteStore


def finished(target: str, status: int = 200, method: bytes = b"GET", user: str = "alice") -> RequestContext:
    ctx = RequestContext(RequestHead(method, target.encode(), b"1.1", [], b"10.0.0.1"), 0.0)
    ctx.route = route(target)
    ctx.identity = Identity(user, ("dev",), "alice-key", b"")
    ctx.status = status
    return ctx


@pytest.fixture
def reader(tmp_path):
    SqliteStore(tmp_path / "state.db").close()
    reader = SqliteReader(SqliteStore(tmp_path / "state.db"))
    yield reader
    reader.close()


def test_requests_reaching_a_namespace_are_recorded_with_who_and_what(reader, tmp_path):
    observer = ActivityObserver(reader)
    for ctx in (finished("/kubernetes/cluster/prod/api/v1/namespaces/team-a/pods/web-1/log"),
                finished("/kubernetes/cluster/prod/api/v1/namespaces/team-b/pods", status=403),   # refused
                finished("/kubernetes/cluster/prod/api/v1/nodes"),                                # no namespace
                finished("/kubernetes/virtualcluster/prod/vc-host/vc1/api/v1/namespaces/inner/pods"),
                finished("/kubernetes/management/apis/management.loft.sh/v1/users"),
                finished("/kubernetes/cluster/prod/api/v1/namespaces/team-c/pods/p/exec", status=101, method=b"POST")):
        observer.finish(ctx)
    assert sorted(observer.pending) == [("prod", "team-a"), ("prod", "team-c"), ("prod", "vc-host")]
    log = observer.pending[("prod", "team-a")]
    assert (log.subject, log.verb, log.resource, log.subresource, log.name) == ("alice", "get", "pods", "log", "web-1")
    assert observer.pending[("prod", "vc-host")].virtual_cluster == "vc1"
    observer.flush()
    reader.close()  # waits for the write
    stored = {(a.cluster, a.namespace): a for a in SqliteStore(tmp_path / "state.db").list_namespace_activity()}
    assert set(stored) == {("prod", "team-a"), ("prod", "team-c"), ("prod", "vc-host")}
    assert stored[("prod", "team-c")].verb == "create" and stored[("prod", "team-c")].subresource == "exec"


def test_ignored_verbs_and_users_do_not_count(reader):
    observer = ActivityObserver(reader, ActivityConfig(ignore_verbs=frozenset({"watch"}),
                                                       ignore_users=frozenset({"monitor"})))
    observer.finish(finished("/kubernetes/cluster/prod/api/v1/namespaces/a/pods?watch=1"))
    observer.finish(finished("/kubernetes/cluster/prod/api/v1/namespaces/a/pods", user="monitor"))
    assert observer.pending == {}


def test_batches_are_handed_over_once_per_interval(reader, monkeypatch):
    written = []
    monkeypatch.setattr(reader, "record_namespace_activity", lambda batch: written.append(dict(batch)))
    observer = ActivityObserver(reader)
    observer.finish(finished("/kubernetes/cluster/prod/api/v1/namespaces/a/pods"))
    observer.tick()
    assert written == []  # not due yet
    observer.flushed -= 10
    observer.tick()
    assert [list(batch) for batch in written] == [[("prod", "a")]] and observer.pending == {}


def test_activity_config():
    assert parse_config({"activity": {"ignore_verbs": ["watch"]}}).activity == ActivityConfig(
        ignore_verbs=frozenset({"watch"}))
    assert parse_config({}).activity == ActivityConfig()


@pytest.mark.parametrize(("data", "message"), [
    ({"enabled": "yes"}, "activity.enabled: must be true or false"),
    ({"ignore_verbs": "watch"}, "activity.ignore_verbs: must be a list"),
    ({"ignore_verbs": [""]}, "activity.ignore_verbs: must be a list of non-empty strings"),
    ({"ignore_user": []}, "activity.ignore_user"),
])
def test_bad_activity_config_names_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"activity": data})
