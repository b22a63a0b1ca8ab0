"""Property tests of the pure functions the request path is built of: routing, request info,
scope checks, the client-header pass and the response-head relay. Each property is checked over
generated inputs (hypothesis); the profile below keeps the whole file to a few seconds."""
from __future__ import annotations

import httptools
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastproxy import headers as hdrs
from fastproxy.auth.identity import identity_header_lines
from fastproxy.auth.requestinfo import request_info, request_verb
from fastproxy.auth.scopes import check_scope, covers, load_scope
from fastproxy.routing import CLUSTER, normalise_path, route
from fastproxy.status import StatusError

settings.register_profile("suite", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")

# ---- paths: segments that matter to normalisation, mixed with arbitrary printable text -------

# What the request-line parser lets through into a target: printable ASCII, no space.
_URL_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7e)
_TRICKY_SEGMENTS = st.sampled_from([
    "", ".", "..", "%2e", "%2E", ".%2e", "%2e.", "%2E%2e", "%2f", "%2F", "%5c", "%5C", "%00", "a\\b",
    "kubernetes", "cluster", "c", "prod-1", "api", "v1", "namespaces", "pods", "...", "a.b", "%41",
])
_SEGMENT = st.one_of(_TRICKY_SEGMENTS, st.text(_URL_CHARS.filter(lambda c: c not in "/?#"), max_size=6))
_PATHS = st.lists(_SEGMENT, max_size=8).map(lambda segments: "/" + "/".join(segments))
_CLUSTER_PATHS = st.lists(_SEGMENT, max_size=6).map(lambda segments: "/kubernetes/cluster/c/" + "/".join(segments))


def _normalised_or_refused(path: str) -> str | None:
    try:
        return normalise_path(path)
    except StatusError as err:
        assert err.code == 400
        return None


@given(st.one_of(_PATHS, _CLUSTER_PATHS))
def test_a_normalised_path_holds_nothing_ambiguous(path):
    normal = _normalised_or_refused(path)
    if normal is None:
        return
    assert normal.startswith("/") and "//" not in normal and "\\" not in normal and "\x00" not in normal
    segments = normal.lower().split("/")
    assert not {"..", ".%2e", "%2e.", "%2e%2e", ".", "%2e"} & set(segments)
    assert not any(escape in normal.lower() for escape in ("%2f", "%5c", "%00"))


@given(st.one_of(_PATHS, _CLUSTER_PATHS))
def test_normalising_twice_changes_nothing(path):
    normal = _normalised_or_refused(path)
    if normal is not None:
        assert normalise_path(normal) == normal


@given(_CLUSTER_PATHS, st.text(_URL_CHARS.filter(lambda c: c != "#"), max_size=12))
def test_what_is_routed_is_what_is_forwarded(path, query):
    """The cluster receives the path the gateway routed (and authorised), the query unchanged."""
    target = path + "?" + query if query else path
    try:
        where = route(target)
    except StatusError as err:
        assert err.code in (400, 404)
        return
    normal = normalise_path(path)
    assert where.kind == CLUSTER and where.cluster == "c"
    assert normal in ("/kubernetes/cluster/c" + where.path, "/kubernetes/cluster/c" + where.path.rstrip("/"))
    assert normalise_path(where.path) == where.path
    assert where.query == query


# ---- request info ---------------------------------------------------------------------------

_METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "get", ""])


@given(_METHODS, st.text(max_size=40), st.text(max_size=40))
def test_request_info_never_raises(method, path, query):
    info = request_info(method, path, query)
    assert info.path == path and isinstance(info.verb, str)


@given(_METHODS, _PATHS, st.text(_URL_CHARS, max_size=30))
def test_the_fast_verb_agrees_with_request_info(method, path, query):
    normal = _normalised_or_refused(path)
    if normal is not None:
        assert request_verb(method, normal, query) == request_info(method, normal, query).verb


_NAME = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True).filter(
    lambda name: name not in ("namespaces", "watch", "proxy", "status", "finalize"))


@st.composite
def _documented_requests(draw):
    """A request in one of the URL forms the API server documents, with what it must mean."""
    group = draw(st.sampled_from(["", "apps", "batch", "management.loft.sh"]))
    version = draw(st.sampled_from(["v1", "v1beta1"]))
    namespace = draw(st.one_of(st.just(""), _NAME))
    resource = draw(st.sampled_from(["pods", "deployments", "configmaps", "jobs", "secrets"]))
    name = draw(st.one_of(st.just(""), _NAME))
    subresource = draw(st.sampled_from(["", "status", "log", "exec", "scale"])) if name else ""
    method = draw(st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]))
    watch = draw(st.sampled_from(["", "watch=true", "watch=1", "watch=false", "watch=0", "limit=5"]))
    path = "/api/" + version if not group else f"/apis/{group}/{version}"
    if namespace:
        path += "/namespaces/" + namespace
    path += "/" + resource + ("/" + name if name else "") + ("/" + subresource if subresource else "")
    verb = {"GET": "get", "HEAD": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
    if not name and verb == "get":
        verb = "watch" if watch in ("watch=true", "watch=1") else "list"
    elif not name and verb == "delete":
        verb = "deletecollection"
    return method, path, watch, (verb, group, version, namespace, resource, subresource, name)


@given(_documented_requests())
def test_request_info_reads_the_documented_url_forms_as_the_api_server_does(req):
    method, path, query, expected = req
    info = request_info(method, path, query)
    assert info.is_resource_request
    assert (info.verb, info.api_group, info.api_version, info.namespace, info.resource, info.subresource,
            info.name) == expected
    assert request_verb(method, path, query) == expected[0]


# ---- scope checks ---------------------------------------------------------------------------

_CLUSTERS = st.sampled_from(["a", "b", "*"])
_PROJECTS = st.sampled_from(["p", "q", "*"])


@st.composite
def _scopes(draw):
    scope = {}
    if draw(st.booleans()):
        scope["clusters"] = [{"cluster": c} for c in draw(st.lists(_CLUSTERS, max_size=2, unique=True))]
    if draw(st.booleans()):
        scope["projects"] = [{"project": p} for p in draw(st.lists(_PROJECTS, max_size=2, unique=True))]
    if draw(st.booleans()):
        scope["spaces"] = [{"project": draw(st.sampled_from(["p", "q"])), "space": draw(st.sampled_from(["s", "*"]))}]
    if draw(st.booleans()):
        scope["rules"] = [{
            "verbs": draw(st.lists(st.sampled_from(["get", "list", "create", "*"]), max_size=2, unique=True)),
            "resources": [{"group": draw(st.sampled_from(["", "apps", "*"])),
                           "resources": draw(st.lists(st.sampled_from(["pods", "pods/log", "pods/*", "*"]),
                                                      max_size=2, unique=True))}],
            "namespaces": draw(st.lists(st.sampled_from(["x", "y"]), max_size=1)),
            "cluster": draw(st.sampled_from(["", "a", "b"])),
        }]
    if draw(st.booleans()):
        scope["roles"] = [{"role": "loft-cli"}]
    return scope


_TARGETS = st.sampled_from(["Cluster", "VirtualCluster", "ProjectSpace", "ProjectVirtualCluster", "Management"])


@st.composite
def _checked_requests(draw):
    """A request info (from a real method, path and query) and where it goes."""
    method, path, query, _ = draw(_documented_requests())
    if draw(st.booleans()):
        path = draw(st.sampled_from(["/version", "/api", "/apis", "/openapi/v2", "/healthz"]))
    return (request_info(method, path, query), draw(_TARGETS), draw(st.sampled_from(["a", "b", "c"])),
            draw(st.sampled_from(["p", "q"])), draw(st.sampled_from(["s", "t"])))


def _allows(scope, req) -> bool:
    info, target, cluster, project, space = req
    return check_scope(scope, info, target, cluster, project=project, space=space, virtual_cluster=space) is None


@given(_checked_requests())
def test_no_scope_allows_everything(req):
    assert _allows(None, req)


@given(_scopes(), _checked_requests())
def test_a_scope_check_answers_none_or_one_line(scope, req):
    info, target, cluster, project, space = req
    denial = check_scope(load_scope(scope), info, target, cluster, project=project, space=space)
    assert denial is None or (denial and "\n" not in denial)


@given(_scopes(), _scopes(), _checked_requests())
def test_adding_grants_never_takes_a_permission_away(first, second, req):
    merged = {key: first.get(key, []) + [grant for grant in second.get(key, []) if grant not in first.get(key, [])]
              for key in first.keys() | second.keys()}
    if _allows(load_scope(first), req):
        assert _allows(load_scope(merged), req)


@given(_scopes(), _scopes(), _checked_requests())
def test_a_covered_scope_allows_nothing_its_limit_does_not(limit, wanted, req):
    if covers(limit, wanted) and _allows(load_scope(wanted), req):
        assert _allows(load_scope(limit), req)


# ---- the client-header pass -----------------------------------------------------------------

_HEADER_VALUE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=12).map(str.encode)
_CLIENT_NAMES = st.sampled_from([
    b"Authorization", b"authorization", b"Impersonate-User", b"impersonate-group", b"Impersonate-Uid",
    b"Impersonate-Extra-Scopes", b"Connection", b"Keep-Alive", b"Proxy-Authorization", b"Proxy-Connection",
    b"Proxy", b"PROXY-authorization", b"Host", b"TE", b"Trailer", b"Upgrade", b"X-Forwarded-For", b"Expect",
    b"Accept", b"User-Agent", b"X-Custom", b"Content-Type", b"Sec-WebSocket-Protocol",
])
# Every name the gateway sets or strips: none of them may come from the client.
_NEVER_FROM_CLIENT = {b"authorization", b"proxy-authorization", b"proxy-connection", b"proxy", b"connection",
                      b"keep-alive", b"te", b"trailer", b"upgrade", b"host", b"expect", b"transfer-encoding"}


_CLIENT_HEADERS = st.lists(st.tuples(_CLIENT_NAMES, st.one_of(
    _HEADER_VALUE, st.sampled_from([b"close", b"keep-alive", b"X-Custom, Impersonate-User", b"Accept", b"100-continue"]))),
    max_size=10)
GATEWAY_HOST = b"Host: cluster.example:6443\r\n"
GATEWAY_CREDENTIAL = b"Authorization: Bearer gateway-token\r\n"
IDENTITY = identity_header_lines("alice", ["dev", "ops"])


def _parsed_head(head: bytes) -> list[tuple[bytes, bytes]]:
    class Fields:
        def __init__(self):
            self.fields = []
            self.complete = False

        def on_header(self, name, value):
            self.fields.append((name.lower(), value))

        def on_headers_complete(self):
            self.complete = True
    seen = Fields()
    httptools.HttpRequestParser(seen).feed_data(head)
    assert seen.complete
    return seen.fields


@given(_CLIENT_HEADERS, st.sampled_from([b"GET", b"POST"]))
def test_the_upstream_head_carries_the_gateways_host_credential_and_identity_only(client_headers, method):
    try:
        found = hdrs.scan_client_headers(client_headers)
    except StatusError as err:
        assert err.code in (400, 417)
        return
    head = hdrs.upstream_request_head(
        method, b"/api/v1/pods", b"1.1", found.kept, host=GATEWAY_HOST, credential=GATEWAY_CREDENTIAL,
        impersonation=IDENTITY, forwarded_for=b"192.0.2.7", framing=b"Content-Length: 0\r\n", upgrade=None)
    fields = _parsed_head(head)
    names = [name for name, _ in fields]
    assert [value for name, value in fields if name == b"host"] == [b"cluster.example:6443"]
    assert [value for name, value in fields if name == b"authorization"] == [b"Bearer gateway-token"]
    assert [(n, v) for n, v in fields if n.startswith(b"impersonate-")] == [
        (b"impersonate-user", b"alice"), (b"impersonate-group", b"dev"), (b"impersonate-group", b"ops")]
    assert not (_NEVER_FROM_CLIENT - {b"host", b"authorization"}) & set(names)
    # What the client's Connection header names is hop-by-hop too.
    named = {token.strip().lower() for name, value in client_headers if name.lower() == b"connection"
             for token in value.split(b",")}
    client_end_to_end = [(n, v) for n, v in client_headers
                         if n.lower() not in _NEVER_FROM_CLIENT | named | {b"x-forwarded-for", b"sec-websocket-protocol"}
                         and not n.lower().startswith(b"impersonate-")]
    assert [(n, v) for n, v in fields if n not in (b"host", b"authorization", b"x-forwarded-for", b"content-length",
                                                  b"sec-websocket-protocol") and not n.startswith(b"impersonate-")
            ] == [(n.lower(), v) for n, v in client_end_to_end]


# ---- the response-head relay ----------------------------------------------------------------

_RESPONSE_NAMES = st.sampled_from([
    b"Content-Type", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Keep-Alive", b"Proxy-Connection",
    b"Proxy-Authenticate", b"TE", b"Trailer", b"Upgrade", b"Audit-Id", b"X-Custom", b"Cache-Control", b"Date",
])
_RESPONSE_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"upgrade"}


@st.composite
def _response_heads(draw):
    status = draw(st.sampled_from([200, 201, 204, 304, 400, 403, 404, 409, 500, 503]))
    fields = []
    for name in draw(st.lists(_RESPONSE_NAMES, max_size=8)):
        if name.lower() == b"content-length":
            value = b"0"
        elif name.lower() == b"transfer-encoding":
            value = b"chunked"
        elif name.lower() == b"connection":
            value = draw(st.sampled_from([b"keep-alive", b"close", b"X-Custom", b"Audit-Id, keep-alive"]))
        else:
            value = draw(_HEADER_VALUE)
        fields.append((name, value))
    if any(n.lower() == b"transfer-encoding" for n, _ in fields):
        fields = [(n, v) for n, v in fields if n.lower() != b"content-length"]
    if len([n for n, _ in fields if n.lower() == b"content-length"]) > 1:
        fields = [(n, v) for n, v in fields if n.lower() != b"content-length"] + [(b"Content-Length", b"0")]
    head = b"HTTP/1.1 %d Reason\r\n" % status + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"
    return status, fields, head


def _parsed_response_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    class Fields:
        def __init__(self):
            self.fields = []

        def on_header(self, name, value):
            self.fields.append((name, value))
    seen = Fields()
    parser = httptools.HttpResponseParser(seen)
    parser.feed_data(head)
    return parser.get_status_code(), seen.fields


@given(_response_heads(), st.booleans())
def test_the_relayed_head_keeps_the_end_to_end_headers_and_sets_its_own_connection(response, keep_alive):
    status, fields, head = response
    relayed_status, relayed = _parsed_response_head(hdrs.relay_response_head(head, keep_alive=keep_alive))
    assert relayed_status == status
    named = {token.strip().lower() for name, value in fields if name.lower() == b"connection"
             for token in value.split(b",")} - {b"keep-alive", b"close"}
    end_to_end = [(n, v) for n, v in fields if n.lower() not in _RESPONSE_HOP_BY_HOP | named]
    ours = [] if keep_alive else [(b"Connection", b"close")]
    assert relayed == end_to_end + ours
