"""Audit events as the observer writes them, from real request contexts built as the gateway builds
them, through the real writer thread into a real file: every field, the stages of a plain request,
a watch and an upgrade, failures and panics, request and response objects and their secrets."""
from __future__ import annotations

import copy
import json
import re
import time
import uuid
from datetime import UTC, datetime

import pytest

from fastproxy.auth.identity import Identity
from fastproxy.context import RequestContext, RequestHead, RequestIds
from fastproxy.observe.audit import INTERNAL_ERROR, REDACTED, AuditConfig, AuditObserver, parse_policy, redact
from fastproxy.routing import route
from fastproxy.status import StatusError

ALICE = Identity("alice", ("dev", "system:authenticated"), "alice-laptop", b"")
SECRET_KEY = "sk-0123456789abcdef-the-access-key"
CLUSTER = "/kubernetes/cluster/prod"
KUBECTL = [("Host", "gateway:8443"), ("User-Agent", "kubectl/v1.31.0 (linux/amd64) kubernetes/abc"),
           ("Authorization", f"Bearer {SECRET_KEY}"), ("Accept", "application/json")]
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def context(target: str, method: str = "GET", headers=KUBECTL, identity: Identity | None = ALICE,
            client_ip: bytes = b"10.1.2.3", upgrade: bool = False) -> RequestContext:
    """A request context as Gateway.responder leaves it for the observers' start."""
    head = RequestHead(method.encode(), target.encode(), b"1.1", [(n.encode(), v.encode()) for n, v in headers],
                       client_ip, upgrade)
    ctx = RequestContext(head, time.monotonic())
    try:
        ctx.route = route(target)
        ctx.identity = identity
    except StatusError as err:
        ctx.message = err.message
    return ctx


def answer(ctx: RequestContext, status: int, message: str = "") -> None:
    """What a responder records before the observers' finish."""
    ctx.status = status
    ctx.message = message or ctx.message
    ctx.first_byte = ctx.first_byte or time.monotonic()
    ctx.ended = time.monotonic()


class Log:
    """An observer on a file in tmp_path, and the events it wrote."""

    def __init__(self, folder, policy=None, **config):
        self.path = folder / "audit.log"
        if policy is not None:
            config["policy"] = parse_policy({"apiVersion": "audit.k8s.io/v1", "kind": "Policy", **policy})
        self.observer = AuditObserver(AuditConfig(path=str(self.path), **config))

    def request(self, ctx: RequestContext, status: int = 200, message: str = "") -> list[dict]:
        self.observer.start_batch([ctx])
        answer(ctx, status, message)
        self.observer.finish_batch([ctx])
        return self.events()

    def events(self) -> list[dict]:
        assert self.observer.flush()
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines()]


@pytest.fixture
def log(tmp_path):
    found = Log(tmp_path)
    yield found
    found.observer.close()


def wall(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


# --- the event, field by field ----------------------------------------------------------------------

def test_a_get_field_by_field(log):
    before = time.time()
    received, complete = log.request(context(f"{CLUSTER}/api/v1/namespaces/dev/pods/web?pretty=true"))
    after = time.time()
    assert received == {
        "kind": "Event", "apiVersion": "audit.k8s.io/v1", "level": "Metadata", "auditID": received["auditID"],
        "stage": "RequestReceived", "requestURI": "/api/v1/namespaces/dev/pods/web?pretty=true", "verb": "get",
        "user": {"username": "alice", "groups": ["dev", "system:authenticated"]}, "sourceIPs": ["10.1.2.3"],
        "userAgent": "kubectl/v1.31.0 (linux/amd64) kubernetes/abc",
        "objectRef": {"resource": "pods", "namespace": "dev", "name": "web", "apiVersion": "v1"},
        "requestReceivedTimestamp": received["requestReceivedTimestamp"], "stageTimestamp": received["stageTimestamp"],
        "annotations": {"fastproxy/requestTarget": "Cluster", "fastproxy/cluster": "prod",
                        "fastproxy/accessKey": "alice-laptop"},
    }
    assert complete == {**received, "stage": "ResponseComplete", "responseStatus": {"metadata": {}, "code": 200},
                        "stageTimestamp": complete["stageTimestamp"]}
    assert uuid.UUID(received["auditID"]).version == 4
    for stamp in (received["requestReceivedTimestamp"], received["stageTimestamp"], complete["stageTimestamp"]):
        assert STAMP.match(stamp) and before - 0.001 <= wall(stamp) <= after + 0.001
    assert received["stageTimestamp"] == received["requestReceivedTimestamp"] <= complete["stageTimestamp"]


def test_timestamps_of_a_batch_across_seconds(log):
    """One batch, its requests begun and ended in several whole seconds (before, in and after the
    first one's): every stamp is its monotonic time on the wall clock, to the microsecond."""
    now = time.monotonic()
    wall_offset = time.time() - now
    batch = []
    for started, ended in ((0.0, 0.2), (-1.3, 0.4), (0.6, 2.7), (1.05, 1.999999)):
        ctx = context(f"{CLUSTER}/api/v1/pods")
        ctx.started, ctx.status, ctx.ended = now + started, 200, now + ended
        batch.append(ctx)
    log.observer.start_batch(batch)
    events = log.events()
    assert len(events) == 8
    for ctx, (received, complete) in zip(batch, zip(events[::2], events[1::2])):
        assert abs(wall(received["requestReceivedTimestamp"]) - (wall_offset + ctx.started)) < 0.002
        assert abs(wall(complete["stageTimestamp"]) - (wall_offset + ctx.ended)) < 0.002
        assert received["stageTimestamp"] == received["requestReceivedTimestamp"] == complete["requestReceivedTimestamp"]
        for stamp in (received["stageTimestamp"], complete["stageTimestamp"]):
            assert STAMP.match(stamp)


def test_the_request_id_is_the_audit_id(log):
    """With a request id (the access log's, sent as X-Request-Id) the events carry it as auditID."""
    ctx = context(f"{CLUSTER}/api/v1/pods")
    RequestIds().assign(ctx)
    assert uuid.UUID(ctx.request_id).version == 4 and ctx.id_line == f"X-Request-Id: {ctx.request_id}\r\n".encode()
    log.observer.start_batch([ctx])
    answer(ctx, 200)
    log.observer.finish_batch([ctx])
    assert [e["auditID"] for e in log.events()] == [ctx.request_id, ctx.request_id]


def test_each_request_has_its_own_audit_id(log):
    for name in ("a", "b", "c"):
        log.request(context(f"{CLUSTER}/api/v1/namespaces/dev/configmaps/{name}"))
    ids = [event["auditID"] for event in log.events()]
    assert ids[0] == ids[1] != ids[2] == ids[3] != ids[4] == ids[5] != ids[0]


def test_the_credential_never_appears(log):
    log.request(context(f"{CLUSTER}/api/v1/pods", headers=[*KUBECTL, ("Cookie", "session=x")]))
    text = log.path.read_text()
    assert SECRET_KEY not in text and "Bearer" not in text and "Authorization" not in text
    assert '"fastproxy/accessKey":"alice-laptop"' in text  # the key's name, never the key


def test_object_ref_of_a_group_subresource_and_a_list(log):
    events = log.request(context(f"{CLUSTER}/apis/apps/v1/namespaces/dev/deployments/api/scale", "PUT"))
    assert events[-1]["objectRef"] == {"resource": "deployments", "namespace": "dev", "name": "api",
                                       "apiGroup": "apps", "apiVersion": "v1", "subresource": "scale"}
    assert events[-1]["verb"] == "update"
    events = log.request(context(f"{CLUSTER}/apis/rbac.authorization.k8s.io/v1/clusterroles"))
    assert events[-1]["objectRef"] == {"resource": "clusterroles", "apiGroup": "rbac.authorization.k8s.io",
                                       "apiVersion": "v1"}
    assert events[-1]["verb"] == "list"


def test_a_non_resource_request_has_no_object_ref(log):
    events = log.request(context(f"{CLUSTER}/version"))
    assert [e["verb"] for e in events] == ["get", "get"] and "objectRef" not in events[-1]
    assert events[-1]["requestURI"] == "/version"


def test_the_impersonation_the_client_asked_for(log):
    headers = [*KUBECTL, ("Impersonate-User", "bob"), ("impersonate-group", "qa"), ("Impersonate-Group", "ops"),
               ("Impersonate-Uid", "1234"), ("Impersonate-Extra-Scopes%2Fcluster", "prod")]
    events = log.request(context(f"{CLUSTER}/api/v1/namespaces/dev/pods", headers=headers), 403, "not allowed")
    for event in events:
        assert event["impersonatedUser"] == {"username": "bob", "groups": ["qa", "ops"], "uid": "1234",
                                             "extra": {"scopes/cluster": ["prod"]}}
        assert event["user"]["username"] == "alice"  # who authenticated
    assert "impersonatedUser" not in log.request(context(f"{CLUSTER}/api/v1/pods"))[-1]


def test_source_ips_as_the_api_server_lists_them(log):
    headers = [*KUBECTL, ("X-Forwarded-For", "203.0.113.9, not-an-ip, 2001:db8::1"), ("X-Real-Ip", "198.51.100.7")]
    events = log.request(context(f"{CLUSTER}/api/v1/pods", headers=headers, client_ip=b"10.9.9.9"))
    assert events[-1]["sourceIPs"] == ["203.0.113.9", "2001:db8::1", "198.51.100.7", "10.9.9.9"]
    headers = [*KUBECTL, ("X-Forwarded-For", "10.9.9.9")]  # the peer is not repeated
    assert log.request(context(f"{CLUSTER}/api/v1/pods", headers=headers, client_ip=b"10.9.9.9"))[-1]["sourceIPs"] == \
        ["10.9.9.9"]


def test_a_refusal_has_its_reason_and_message(log):
    events = log.request(context(f"{CLUSTER}/api/v1/namespaces/dev/secrets"), 403,
                         'the access key may not list secrets in namespace "dev"')
    assert events[-1]["responseStatus"] == {"metadata": {}, "status": "Failure", "reason": "Forbidden", "code": 403,
                                            "message": 'the access key may not list secrets in namespace "dev"'}
    events = log.request(context(f"{CLUSTER}/api/v1/pods", identity=None), 401, "invalid access key")
    assert events[-1]["user"] == {} and events[-1]["responseStatus"]["reason"] == "Unauthorized"
    assert "fastproxy/accessKey" not in events[-1]["annotations"]
    events = log.request(context(f"{CLUSTER}/api/v1/pods"), 404)  # the cluster's own 404: no message of ours
    assert events[-1]["responseStatus"] == {"metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404}


def test_a_request_refused_before_routing(log):
    ctx = context("/kubernetes/cluster/prod/../x")
    assert ctx.route is None and ctx.message
    events = log.request(ctx, 400)
    assert [e["stage"] for e in events] == ["RequestReceived", "ResponseComplete"]
    last = events[-1]
    assert last["requestURI"] == "/kubernetes/cluster/prod/../x" and last["verb"] == "get" and last["user"] == {}
    assert "objectRef" not in last and "annotations" not in last
    assert last["responseStatus"]["message"] == "request path must not contain '..' segments"


def test_no_query_outside_the_kubernetes_apis(log):
    """An OAuth code in the query of an /oidc/ or /auth/ request is never written."""
    for target in ("/oidc/callback?code=the-secret-code&state=s1", "/auth/login?token=the-secret-code"):
        events = log.request(context(target, identity=None))
        assert events[-1]["requestURI"] == target.partition("?")[0]
    assert "the-secret-code" not in log.path.read_text()


def test_health_and_the_management_api(log):
    events = log.request(context("/healthz", identity=None))
    assert events[-1]["requestURI"] == "/healthz" and "annotations" not in events[-1]
    events = log.request(context("/kubernetes/management/apis/management.loft.sh/v1/users/bob", "DELETE"))
    assert events[-1]["objectRef"] == {"resource": "users", "name": "bob", "apiGroup": "management.loft.sh",
                                       "apiVersion": "v1"}
    assert events[-1]["annotations"] == {"fastproxy/requestTarget": "Management", "fastproxy/accessKey": "alice-laptop"}
    assert events[-1]["requestURI"] == "/apis/management.loft.sh/v1/users/bob" and events[-1]["verb"] == "delete"


def test_a_virtual_cluster_is_annotated(log):
    events = log.request(context("/kubernetes/virtualcluster/host/team-a/vc1/api/v1/pods"))
    assert events[-1]["annotations"] == {"fastproxy/requestTarget": "VirtualCluster", "fastproxy/cluster": "host",
                                         "fastproxy/virtualCluster": "team-a/vc1", "fastproxy/accessKey": "alice-laptop"}


# --- stages -----------------------------------------------------------------------------------------

def test_a_request_finished_before_its_batch_gets_the_same_events(log):
    """The observer's fast path (a request begun and finished between two batches) writes what the
    path over two batches writes, a shape seen before or not."""
    audit = log.observer
    target = f"{CLUSTER}/api/v1/namespaces/dev/configmaps/web?resourceVersion=0"
    for _ in range(2):  # the second time from the cached shape
        two_batches, one_batch = context(target), context(target)
        audit.start_batch([two_batches])
        answer(two_batches, 200)
        audit.finish_batch([two_batches])
        answer(one_batch, 200)
        audit.start_batch([one_batch])
        audit.finish_batch([one_batch])
        events = log.events()[-4:]
        assert [e["stage"] for e in events] == ["RequestReceived", "ResponseComplete"] * 2
        assert events[0]["auditID"] == events[1]["auditID"] != events[2]["auditID"] == events[3]["auditID"]
        for event, ctx in zip(events, (two_batches, two_batches, one_batch, one_batch)):
            assert abs(wall(event["requestReceivedTimestamp"]) - (time.time() - time.monotonic() + ctx.started)) < 0.01
            assert STAMP.match(event["stageTimestamp"])
        assert abs(wall(events[3]["stageTimestamp"]) - (time.time() - time.monotonic() + one_batch.ended)) < 0.01
        for first, second in ((events[0], events[2]), (events[1], events[3])):
            ignored = ("auditID", "requestReceivedTimestamp", "stageTimestamp")
            assert {k: v for k, v in first.items() if k not in ignored} == \
                {k: v for k, v in second.items() if k not in ignored}
    assert not audit.requests


def test_a_plain_request_has_no_response_started(log):
    assert [e["stage"] for e in log.request(context(f"{CLUSTER}/api/v1/pods"))] == ["RequestReceived", "ResponseComplete"]


def test_a_watch_gets_response_started_on_the_tick_after_its_first_byte(log):
    audit = log.observer
    ctx = context(f"{CLUSTER}/api/v1/namespaces/dev/pods?watch=1&resourceVersion=10")
    audit.start_batch([ctx])
    audit.tick()                           # no response yet: nothing owed
    assert [e["stage"] for e in log.events()] == ["RequestReceived"]
    first_byte_wall = time.time()
    ctx.status, ctx.first_byte = 200, time.monotonic()
    time.sleep(0.05)
    audit.tick()
    audit.tick()                           # only once
    started = log.events()[1:]
    assert [e["stage"] for e in started] == ["ResponseStarted"]
    assert started[0]["responseStatus"] == {"metadata": {}, "code": 200}
    assert abs(wall(started[0]["stageTimestamp"]) - first_byte_wall) < 0.02  # the first byte's time, not the tick's
    time.sleep(0.05)
    ctx.ended = time.monotonic()
    audit.finish_batch([ctx])
    events = log.events()
    assert [e["stage"] for e in events] == ["RequestReceived", "ResponseStarted", "ResponseComplete"]
    assert len({e["auditID"] for e in events}) == 1 and events[0]["verb"] == "watch"
    assert wall(events[2]["stageTimestamp"]) - wall(events[1]["stageTimestamp"]) >= 0.05
    assert not audit.long_running and not audit.requests


def test_a_watch_that_ends_before_a_tick_gets_response_started_at_its_finish(log):
    events = log.request(context(f"{CLUSTER}/api/v1/pods?watch=true"))
    assert [e["stage"] for e in events] == ["RequestReceived", "ResponseStarted", "ResponseComplete"]
    assert events[1]["stageTimestamp"] <= events[2]["stageTimestamp"]


def test_follow_logs_and_upgrades_are_long_running(log):
    audit = log.observer
    logs = context(f"{CLUSTER}/api/v1/namespaces/dev/pods/web/log?follow=true")
    upgrade = context(f"{CLUSTER}/api/v1/namespaces/dev/pods/web/exec?command=sh", "POST",
                      headers=[*KUBECTL, ("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1")], upgrade=True)
    audit.start_batch([logs, upgrade])
    upgrade.status, upgrade.first_byte = 101, time.monotonic()
    audit.tick()
    assert [(e["stage"], e["objectRef"].get("subresource")) for e in log.events()] == \
        [("RequestReceived", "log"), ("RequestReceived", "exec"), ("ResponseStarted", "exec")]
    assert log.events()[-1]["responseStatus"]["code"] == 101
    answer(logs, 200)
    answer(upgrade, 101)
    audit.finish_batch([upgrade])
    audit.finish_batch([logs])
    assert [e["stage"] for e in log.events()[3:]] == ["ResponseComplete", "ResponseStarted", "ResponseComplete"]


def test_a_panic_replaces_response_complete(log):
    events = log.request(context("/kubernetes/management/apis/management.loft.sh/v1/users"), 500, INTERNAL_ERROR)
    assert [e["stage"] for e in events] == ["RequestReceived", "Panic"]
    assert events[-1]["responseStatus"] == {"metadata": {}, "status": "Failure", "message": INTERNAL_ERROR,
                                            "reason": "InternalError", "code": 500}
    # A 500 the cluster answered is an ordinary response.
    assert log.request(context(f"{CLUSTER}/api/v1/pods"), 500)[-1]["stage"] == "ResponseComplete"


def test_a_client_that_left_before_any_response(log):
    audit = log.observer
    ctx = context(f"{CLUSTER}/api/v1/pods")
    audit.start_batch([ctx])
    ctx.ended = time.monotonic()
    audit.finish_batch([ctx])
    last = log.events()[-1]
    assert last["stage"] == "ResponseComplete" and "responseStatus" not in last
    assert last["annotations"]["fastproxy/response"] == "none: the client left first"
    assert last["annotations"]["fastproxy/cluster"] == "prod"


def test_omit_stages(tmp_path):
    log = Log(tmp_path, {"omitStages": ["RequestReceived"], "rules": [
        {"level": "Metadata", "verbs": ["watch"], "omitStages": ["ResponseStarted"]}, {"level": "Metadata"}]})
    assert [e["stage"] for e in log.request(context(f"{CLUSTER}/api/v1/pods?watch=1"))] == ["ResponseComplete"]
    assert [e["stage"] for e in log.request(context(f"{CLUSTER}/api/v1/pods"))[1:]] == ["ResponseComplete"]
    log.observer.close()


def test_level_none_writes_nothing_and_keeps_nothing(tmp_path):
    log = Log(tmp_path, {"rules": [{"level": "None", "users": ["alice"]},
                                   {"level": "Request", "nonResourceURLs": ["/healthz"]}]})
    assert log.request(context(f"{CLUSTER}/api/v1/pods")) == []
    assert log.request(context(f"{CLUSTER}/api/v1/pods", identity=None)) == []  # matches no rule
    assert not log.observer.requests and log.observer.writer.queued_bytes == 0
    assert [e["level"] for e in log.request(context("/healthz", identity=None))] == ["Request", "Request"]
    log.observer.close()


def test_the_policy_sees_the_request_target_and_cluster(tmp_path):
    log = Log(tmp_path, {"rules": [{"level": "None", "clusters": ["staging"]},
                                   {"level": "RequestResponse", "requestTargets": ["Management"]},
                                   {"level": "Metadata"}]})
    assert log.request(context("/kubernetes/cluster/staging/api/v1/pods")) == []
    assert log.request(context("/kubernetes/management/version"))[-1]["level"] == "RequestResponse"
    assert log.request(context(f"{CLUSTER}/api/v1/pods"))[-1]["level"] == "Metadata"
    log.observer.close()


def test_a_broken_context_never_breaks_the_request(log, caplog):
    odd = Identity("mallory", (object(),), "key", b"")  # a group orjson cannot encode
    ctx = context(f"{CLUSTER}/api/v1/pods", identity=odd)
    log.observer.start_batch([ctx])
    answer(ctx, 200)
    log.observer.finish_batch([ctx])
    assert log.observer.failures == 1 and not log.observer.requests
    assert "audit log: an event could not be made" in caplog.text
    assert len(log.request(context(f"{CLUSTER}/api/v1/pods"))) == 2  # and the next request is logged


# --- objects and secrets ------------------------------------------------------------------------------

USER = {"apiVersion": "management.loft.sh/v1", "kind": "User", "metadata": {"name": "bob"},
        "spec": {"username": "bob", "password": "hunter2", "passwordRef": {"secretName": "bob", "key": "password"}}}
OWNED_KEY = {"apiVersion": "management.loft.sh/v1", "kind": "OwnedAccessKey", "metadata": {"name": "laptop"},
             "spec": {"displayName": "laptop", "key": SECRET_KEY, "user": "alice"}}
TOKEN = {"apiVersion": "management.loft.sh/v1", "kind": "DirectClusterEndpointToken",
         "spec": {"ttl": 3600}, "status": {"token": "eyJhbGciOiJSUzI1NiJ9.payload.signature"}}
SECRET = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db", "annotations": {
    "kubectl.kubernetes.io/last-applied-configuration": '{"data":{"password":"c2VjcmV0"}}', "team": "a"},
    "managedFields": [{"manager": "kubectl"}]},
    "type": "Opaque", "data": {"password": "c2VjcmV0", "user": "YWRtaW4="}, "stringData": {"token": "plain"}}


def test_redact_each_kind_of_secret_and_keep_the_rest():
    original = copy.deepcopy([USER, OWNED_KEY, TOKEN, SECRET])
    user, key, token, secret = redact([USER, OWNED_KEY, TOKEN, SECRET])
    assert user["spec"] == {"username": "bob", "password": REDACTED, "passwordRef": {"secretName": "bob", "key": "password"}}
    assert key["spec"] == {"displayName": "laptop", "key": REDACTED, "user": "alice"}
    assert token["status"] == {"token": REDACTED} and token["spec"] == {"ttl": 3600}
    assert secret["data"] == {"password": REDACTED, "user": REDACTED} and secret["stringData"] == {"token": REDACTED}
    assert secret["metadata"]["annotations"] == {"kubectl.kubernetes.io/last-applied-configuration": REDACTED, "team": "a"}
    assert secret["metadata"]["managedFields"] == [{"manager": "kubectl"}] and secret["type"] == "Opaque"
    assert [USER, OWNED_KEY, TOKEN, SECRET] == original  # the handler's objects are not touched
    assert "managedFields" not in redact(SECRET, omit_managed_fields=True)["metadata"]
    assert redact({"headers": {"Authorization": ["Bearer x"]}, "clientSecret": "s", "tokenTTL": 5}) == \
        {"headers": {"Authorization": REDACTED}, "clientSecret": REDACTED, "tokenTTL": 5}
    watch_event = {"type": "ADDED", "object": SECRET}
    assert redact(watch_event)["object"]["data"]["password"] == REDACTED
    assert redact({"kind": "SecretList", "items": [SECRET]})["items"][0]["stringData"]["token"] == REDACTED


def test_record_bodies_at_request_response(tmp_path):
    log = Log(tmp_path, {"rules": [{"level": "RequestResponse"}]})
    audit = log.observer
    ctx = context("/kubernetes/management/apis/management.loft.sh/v1/ownedaccesskeys", "POST")
    audit.start_batch([ctx])
    created = {**OWNED_KEY, "metadata": {"name": "laptop", "uid": "u1"}}
    audit.record_bodies(ctx, json.dumps({**OWNED_KEY, "spec": {"displayName": "laptop"}}).encode(), created)
    answer(ctx, 201)
    audit.finish_batch([ctx])
    received, complete = log.events()
    assert "requestObject" not in received and "responseObject" not in received
    assert complete["requestObject"]["spec"] == {"displayName": "laptop"}
    assert complete["responseObject"]["spec"]["key"] == REDACTED and complete["responseObject"]["metadata"]["uid"] == "u1"
    assert SECRET_KEY not in log.path.read_text()
    audit.record_bodies(ctx, b"{}", b"{}")  # after the finish: nothing happens
    assert len(log.events()) == 2
    audit.close()


def test_record_bodies_by_level_and_in_yaml(tmp_path):
    log = Log(tmp_path, {"rules": [{"level": "Request", "verbs": ["create"]}, {"level": "Metadata"}]})
    audit = log.observer
    create = context("/kubernetes/management/apis/management.loft.sh/v1/users", "POST")
    get = context("/kubernetes/management/apis/management.loft.sh/v1/users/bob")
    for ctx in (create, get):
        audit.start_batch([ctx])
    audit.record_bodies(create, b"kind: User\nspec:\n  username: bob\n  password: hunter2\n", b'{"kind":"User"}')
    audit.record_bodies(get, None, json.dumps(USER).encode())
    for ctx in (create, get):
        answer(ctx, 200)
        audit.finish_batch([ctx])
    create_event, get_event = log.events()[2:]
    assert create_event["requestObject"] == {"kind": "User", "spec": {"username": "bob", "password": REDACTED}}
    assert "responseObject" not in create_event  # level Request: the request's object only
    assert "requestObject" not in get_event and "responseObject" not in get_event  # Metadata
    assert "hunter2" not in log.path.read_text()
    audit.close()


def test_objects_beyond_max_object_bytes_are_left_out_and_said_so(tmp_path):
    log = Log(tmp_path, {"rules": [{"level": "RequestResponse"}]}, max_object_bytes=200)
    audit = log.observer
    ctx = context("/kubernetes/management/apis/management.loft.sh/v1/users", "POST")
    audit.start_batch([ctx])
    big = json.dumps({"kind": "User", "spec": {"description": "x" * 300}}).encode()
    audit.record_bodies(ctx, big, {"kind": "UserList", "items": [{"description": "y" * 300}]})
    answer(ctx, 201)
    audit.finish_batch([ctx])
    last = log.events()[-1]
    assert "requestObject" not in last and "responseObject" not in last
    assert last["annotations"]["fastproxy/requestObject"] == f"left out: {len(big)} bytes, more than max_object_bytes 200"
    assert last["annotations"]["fastproxy/responseObject"].startswith("left out: ")
    assert last["annotations"]["fastproxy/requestTarget"] == "Management"
    ctx = context("/kubernetes/management/apis/management.loft.sh/v1/users", "POST")
    audit.start_batch([ctx])
    audit.record_bodies(ctx, b"\x00\xff not a document: [", None)
    answer(ctx, 400)
    audit.finish_batch([ctx])
    assert log.events()[-1]["annotations"]["fastproxy/requestObject"] == "left out: neither JSON nor YAML"
    audit.close()
