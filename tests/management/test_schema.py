"""The management API's documents and checks (fastproxy.management.schema), and real kubectl reading them."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from fastproxy.management import schema
from fastproxy.management.schema import RESOURCES

USERS = schema.resource("users")
KEYS = schema.resource("ownedaccesskeys")
CLUSTERS = schema.resource("clusters")
NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
CREATED = "2023-11-12T18:13:20Z"  # 2 days 4 hours before NOW


def user(name: str = "jane", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "management.loft.sh/v1", "kind": "User",
            "metadata": {"name": name, "uid": f"uid-{name}", "creationTimestamp": CREATED},
            "spec": {"username": name, "displayName": name.title(), "email": f"{name}@example.com", "groups": ["dev"],
                     "disabled": False, **spec},
            "status": {"teams": ["developers"]}}


def causes(obj: dict[str, Any], resource: schema.Resource | None = USERS, *, for_create: bool = True) -> list[tuple[str, str]]:
    assert resource is not None
    return [(cause.type, cause.field) for cause in schema.validate(resource, obj, for_create=for_create)]


# --- resources and discovery -----------------------------------------------------------------------

def test_the_resources_and_their_verbs():
    verbs = {resource.plural: resource.verbs for resource in RESOURCES}
    stored = ("create", "delete", "get", "list", "patch", "update", "watch")
    assert verbs == {"users": stored, "teams": stored, "ownedaccesskeys": stored, "selves": ("create",),
                     "directclusterendpointtokens": ("create",), "clusters": ("get", "list", "watch"),
                     "namespaceactivities": ("get", "list", "watch"), "virtualclusterinstances": stored}
    assert [resource.plural for resource in RESOURCES if resource.namespaced] == ["virtualclusterinstances"]
    assert schema.resource("users") is USERS and USERS.list_kind == "UserList" and USERS.singular == "user"
    assert schema.resource("pods") is None


def test_version_info_is_kubernetes_shaped():
    info = schema.version_info()
    assert info["major"] == "1" and info["minor"].isdigit()
    assert info["gitVersion"].startswith(f"v1.{info['minor']}.0+fastproxy.")
    assert info["platform"].count("/") == 1 and set(info) >= {"gitCommit", "buildDate", "goVersion", "compiler"}


def test_plain_discovery_documents():
    assert schema.api_versions() == {"kind": "APIVersions", "versions": [], "serverAddressByClientCIDRs": []}
    group_version = {"groupVersion": "management.loft.sh/v1", "version": "v1"}
    group = {"name": "management.loft.sh", "versions": [group_version], "preferredVersion": group_version}
    assert schema.api_group_list() == {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}
    assert schema.api_group() == {"kind": "APIGroup", "apiVersion": "v1", **group}
    listed = schema.api_resource_list()
    assert listed["kind"] == "APIResourceList" and listed["groupVersion"] == "management.loft.sh/v1"
    users = next(entry for entry in listed["resources"] if entry["name"] == "users")
    assert users == {"name": "users", "singularName": "user", "namespaced": False, "kind": "User",
                     "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
    assert [entry["name"] for entry in listed["resources"]] == [resource.plural for resource in RESOURCES]


def test_aggregated_discovery_in_both_versions():
    v2 = schema.aggregated_discovery("v2")
    assert v2["kind"] == "APIGroupDiscoveryList" and v2["apiVersion"] == "apidiscovery.k8s.io/v2"
    (group,) = v2["items"]
    assert group["metadata"] == {"name": "management.loft.sh"}
    (version,) = group["versions"]
    assert version["version"] == "v1" and version["freshness"] == "Current"
    selves = next(entry for entry in version["resources"] if entry["resource"] == "selves")
    assert selves == {"resource": "selves", "responseKind": {"group": "management.loft.sh", "version": "v1", "kind": "Self"},
                      "scope": "Cluster", "singularResource": "self", "verbs": ["create"]}
    beta = schema.aggregated_discovery("v2beta1")
    assert beta["apiVersion"] == "apidiscovery.k8s.io/v2beta1" and beta["items"] == v2["items"]
    assert schema.aggregated_discovery("v2", legacy=True)["items"] == []


@pytest.mark.parametrize(("accept", "form"), [
    ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
     "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json", "v2"),
    ("application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json", "v2beta1"),
    ("application/json; g=apidiscovery.k8s.io; v=v2; as=APIGroupDiscoveryList; q=0.5, "
     "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList", "v2beta1"),
    ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList;q=0", None),
    ("application/vnd.kubernetes.protobuf;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList", None),
    ("application/json, */*", None),
    ("", None),
])
def test_discovery_form_from_accept(accept, form):
    assert schema.discovery_form(accept) == form


@pytest.mark.parametrize(("accept", "asked"), [
    ("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json", True),
    ("application/json;as=Table;v=v1beta1;g=meta.k8s.io", True),
    ("application/json;as=Table;g=meta.k8s.io;v=v1;q=0", False),
    ("application/json;as=Table;v=v2;g=meta.k8s.io", False),
    ("application/json", False),
])
def test_table_asked(accept, asked):
    assert schema.table_asked(accept) is asked


# --- OpenAPI -----------------------------------------------------------------------------------------

def openapi() -> dict[str, Any]:
    return orjson.loads(schema.openapi_v3_group())


def resolved(doc: dict[str, Any], field_schema: dict[str, Any]) -> dict[str, Any]:
    ref = (field_schema.get("allOf") or [field_schema])[0].get("$ref")
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else field_schema


def test_every_field_of_every_resource_is_in_its_openapi_schema():
    doc = openapi()
    schemas = doc["components"]["schemas"]
    for resource in RESOURCES:
        kind = schemas[f"com.github.loft-sh.api.v4.pkg.apis.management.v1.{resource.kind}"]
        assert kind["x-kubernetes-group-version-kind"] == [{"group": "management.loft.sh", "kind": resource.kind, "version": "v1"}]
        assert set(kind["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
        for part, node in (("spec", resource.spec), ("status", resource.status)):
            published = resolved(doc, kind["properties"][part])
            assert set(published["properties"]) == set(node.properties), (resource.kind, part)
            for name, field_schema in published["properties"].items():
                assert field_schema.get("description"), (resource.kind, part, name)


def test_openapi_schema_details():
    doc = openapi()
    schemas = doc["components"]["schemas"]
    key_spec = resolved(doc, schemas["com.github.loft-sh.api.v4.pkg.apis.management.v1.OwnedAccessKey"]["properties"]["spec"])
    assert key_spec["properties"]["type"]["enum"] == ["", "Login", "User", "Other"]
    assert key_spec["properties"]["ttl"] == {"type": "integer", "description": key_spec["properties"]["ttl"]["description"],
                                             "format": "int64"}
    scope = resolved(doc, key_spec["properties"]["scope"])
    assert set(scope["properties"]) == {"roles", "projects", "spaces", "virtualClusters", "clusters", "rules", "allowLoftCli"}
    rule = resolved(doc, scope["properties"]["rules"]["items"])
    assert set(rule["properties"]) == {"verbs", "resources", "namespaces", "nonResourceURLs", "requestTargets", "cluster",
                                       "virtualClusters"}
    assert set(resolved(doc, rule["properties"]["resources"]["items"])["properties"]) == {"group", "resources", "resourceNames"}
    meta = schemas["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"]["properties"]
    assert {"name", "generateName", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
            "labels", "annotations", "ownerReferences", "finalizers", "managedFields"} <= set(meta)
    assert meta["labels"]["additionalProperties"] == {"type": "string"}
    assert schemas["com.github.loft-sh.api.v4.pkg.apis.management.v1.UserList"]["properties"]["items"]["items"]["allOf"] == [
        {"$ref": "#/components/schemas/com.github.loft-sh.api.v4.pkg.apis.management.v1.User"}]
    assert "com.github.loft-sh.api.v4.pkg.apis.management.v1.SelfList" not in schemas  # selves are never listed


def test_openapi_paths_and_operations():
    paths = openapi()["paths"]
    group = "/apis/management.loft.sh/v1"
    users, user_item = paths[f"{group}/users"], paths[f"{group}/users/{{name}}"]
    assert set(users) == {"get", "post"} and set(user_item) == {"get", "put", "patch", "delete", "parameters"}
    assert set(paths[f"{group}/selves"]) == {"post"} and f"{group}/selves/{{name}}" not in paths
    assert set(paths[f"{group}/clusters"]) == {"get"} and set(paths[f"{group}/clusters/{{name}}"]) == {"get", "parameters"}

    def parameters(operation: dict[str, Any]) -> set[str]:
        return {parameter["name"] for parameter in operation["parameters"] if parameter["in"] == "query"}

    for operation in (users["post"], user_item["put"], user_item["patch"], paths[f"{group}/selves"]["post"]):
        assert {"fieldValidation", "dryRun", "fieldManager", "pretty"} <= parameters(operation)
    assert {"labelSelector", "limit", "continue", "watch", "resourceVersion", "allowWatchBookmarks",
            "timeoutSeconds"} <= parameters(users["get"])
    gvk = {"group": "management.loft.sh", "version": "v1", "kind": "User"}
    for operation in (users["get"], users["post"], user_item["get"], user_item["put"], user_item["patch"], user_item["delete"]):
        assert operation["x-kubernetes-group-version-kind"] == gvk
    assert users["get"]["x-kubernetes-action"] == "list" and user_item["patch"]["x-kubernetes-action"] == "patch"
    assert set(user_item["patch"]["requestBody"]["content"]) == {"application/json-patch+json", "application/merge-patch+json",
                                                                 "application/strategic-merge-patch+json"}


def test_openapi_index_names_the_document_by_its_hash():
    digest = hashlib.sha512(schema.openapi_v3_group()).hexdigest().upper()
    assert schema.openapi_v3_index() == {"paths": {"apis/management.loft.sh/v1": {
        "serverRelativeURL": f"/openapi/v3/apis/management.loft.sh/v1?hash={digest}"}}}
    prefixed = schema.openapi_v3_index("/kubernetes/management")["paths"]["apis/management.loft.sh/v1"]["serverRelativeURL"]
    assert prefixed.startswith("/kubernetes/management/openapi/v3/apis/management.loft.sh/v1?hash=")
    assert schema.openapi_v3_group() is schema.openapi_v3_group()  # serialized once


def test_openapi_v2_placeholder_in_both_forms():
    body, content_type = schema.openapi_v2("application/com.github.proto-openapi.spec.v2@v1.0+protobuf")
    assert content_type == "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
    info = b"\n\x18fastproxy management API\x12\x02v1"
    assert body == b"\n\x032.0" + b"\x12" + bytes([len(info)]) + info + b"B\x00J\x00"
    body, content_type = schema.openapi_v2("application/json")
    assert content_type == "application/json" and orjson.loads(body)["swagger"] == "2.0"


# --- validation ----------------------------------------------------------------------------------------

def test_a_valid_object_has_no_causes():
    assert causes(user()) == []
    assert causes(user(), for_create=False) == []
    assert causes({"apiVersion": "management.loft.sh/v1", "kind": "Self", "metadata": {"creationTimestamp": None},
                   "spec": {}, "status": {"accessKey": "k", "anything": {"goes": 1}}}, schema.resource("selves")) == []


def test_wrong_or_missing_kind_and_api_version():
    assert causes({**user(), "kind": "Team"}) == [("FieldValueInvalid", "kind")]
    assert causes({**user(), "apiVersion": "management.loft.sh/v2"}) == [("FieldValueInvalid", "apiVersion")]
    missing = user()
    del missing["kind"], missing["apiVersion"]
    assert causes(missing) == [("FieldValueRequired", "apiVersion"), ("FieldValueRequired", "kind")]
    assert causes({**user(), "kind": 5}) == [("FieldValueTypeInvalid", "kind")]
    (cause,) = schema.validate(USERS, {**user(), "kind": "Team"}, for_create=True)
    assert cause.message == 'Invalid value: "Team": must be User' and not cause.unknown


def test_unknown_fields_at_every_level():
    key = {"apiVersion": "management.loft.sh/v1", "kind": "OwnedAccessKey", "metadata": {"name": "k", "colour": "red"},
           "spec": {"scope": {"roles": [{"role": "agent"}, {"role": "runner", "extra": True}]}, "foo": 1}, "top": {}}
    found = schema.validate(KEYS, key, for_create=True)
    assert [(cause.type, cause.field, cause.unknown) for cause in found] == [
        ("FieldValueInvalid", "metadata.colour", True), ("FieldValueInvalid", "spec.scope.roles[1].extra", True),
        ("FieldValueInvalid", "spec.foo", True), ("FieldValueInvalid", "top", True)]
    assert found[1].message == 'unknown field "spec.scope.roles[1].extra"'
    assert found[1].as_dict() == {"reason": "FieldValueInvalid", "message": 'unknown field "spec.scope.roles[1].extra"',
                                  "field": "spec.scope.roles[1].extra"}


def test_wrong_types():
    bad = user(groups=["a", "b", 3], disabled="yes", email=["x"])
    bad["metadata"]["labels"] = {"team": 1}
    found = {cause.field: cause for cause in schema.validate(USERS, bad, for_create=True)}
    assert set(found) == {"spec.groups[2]", "spec.disabled", "spec.email", "metadata.labels[team]"}
    assert {cause.type for cause in found.values()} == {"FieldValueTypeInvalid"}
    assert found["spec.disabled"].message == 'Invalid value: "string": must be of type boolean'
    assert found["spec.email"].message == 'Invalid value: "array": must be of type string'
    assert causes(user(groups="dev")) == [("FieldValueTypeInvalid", "spec.groups")]
    assert causes({**user(), "spec": []}) == [("FieldValueTypeInvalid", "spec")]
    key = {"apiVersion": "management.loft.sh/v1", "kind": "OwnedAccessKey", "metadata": {"name": "k"},
           "spec": {"ttl": 1.5, "ttlAfterLastActivity": 1, "disabled": True}}
    assert causes(key, KEYS) == [("FieldValueTypeInvalid", "spec.ttl"), ("FieldValueTypeInvalid", "spec.ttlAfterLastActivity")]
    assert causes({**key, "spec": {"ttl": True}}, KEYS) == [("FieldValueTypeInvalid", "spec.ttl")]


def test_null_is_an_absent_field():
    obj = user(email=None)
    obj["metadata"]["labels"] = None
    assert causes(obj) == []


def test_enum_values():
    key = {"apiVersion": "management.loft.sh/v1", "kind": "OwnedAccessKey", "metadata": {"name": "k"}, "spec": {"type": "Root"}}
    (cause,) = schema.validate(KEYS, key, for_create=True)
    assert (cause.type, cause.field) == ("FieldValueNotSupported", "spec.type")
    assert cause.message == 'Unsupported value: "Root": supported values: "", "Login", "User", "Other"'
    for allowed in ("", "Login", "User", "Other"):
        assert causes({**key, "spec": {"type": allowed}}, KEYS) == []


def test_metadata_values():
    assert causes(user(name="Not_A_Name")) == [("FieldValueInvalid", "metadata.name")]
    assert causes({**user(), "metadata": {"generateName": "jane-"}}) == []
    assert causes({**user(), "metadata": {"name": "jane", "resourceVersion": "3"}}) == [("FieldValueInvalid", "metadata.resourceVersion")]
    assert causes({**user(), "metadata": {"name": "jane", "resourceVersion": "3"}}, for_create=False) == []
    owned = {"name": "jane", "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "u", "controller": "no"}],
             "finalizers": ["a", 2], "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:email": {}}}}]}
    assert causes({**user(), "metadata": owned}) == [("FieldValueTypeInvalid", "metadata.ownerReferences[0].controller"),
                                                     ("FieldValueTypeInvalid", "metadata.finalizers[1]")]


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def test_a_depth_bomb_is_one_cause():
    bomb = user()
    bomb["metadata"]["managedFields"] = [{"manager": "m", "fieldsV1": nested(200)}]
    (cause,) = schema.validate(USERS, bomb, for_create=True)
    assert cause.type == "FieldValueInvalid" and "nested more than 32" in cause.message and not cause.unknown
    shallow = user()
    shallow["metadata"]["managedFields"] = [{"manager": "m", "fieldsV1": nested(20)}]
    assert causes(shallow) == []


def test_too_many_values_is_one_cause():
    (cause,) = schema.validate(USERS, user(groups=["g"] * 20_000), for_create=True)
    assert cause.type == "FieldValueTooMany" and "10000" in cause.message
    wide = user()
    wide["spec"].update({f"unknown{index}": 1 for index in range(20_000)})
    assert [kind for kind, _ in causes(wide)] == ["FieldValueTooMany"]
    assert causes(user(groups=["g"] * 5_000)) == []


# --- tables --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("seconds", "shown"), [
    (-5, "<invalid>"), (-1.5, "0s"), (0, "0s"), (5, "5s"), (119, "119s"), (120, "2m"), (200, "3m20s"), (599, "9m59s"),
    (600, "10m"), (3 * 3600 - 1, "179m"), (3 * 3600, "3h"), (7 * 3600 + 59 * 60, "7h59m"), (8 * 3600, "8h"), (47 * 3600, "47h"),
    (48 * 3600, "2d"), (52 * 3600, "2d4h"), (8 * 86400, "8d"), (729 * 86400, "729d"), (730 * 86400, "2y"),
    (731 * 86400, "2y1d"), (8 * 365 * 86400, "8y"), (20 * 365 * 86400, "20y"),
])
def test_human_duration_like_kubectl(seconds, shown):
    assert schema.human_duration(seconds) == shown


def test_age_of_a_timestamp():
    assert schema.age(CREATED, NOW) == "2d4h"
    assert schema.age(None, NOW) == "<unknown>" and schema.age("yesterday", NOW) == "<unknown>"


def test_user_table():
    assert USERS is not None
    table = schema.table(USERS, [user("jane"), user("bob", email="", disabled=True)], list_meta={"resourceVersion": "9"}, now=NOW)
    assert table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1" and table["metadata"] == {"resourceVersion": "9"}
    columns = table["columnDefinitions"]
    assert [column["name"] for column in columns] == ["Name", "Username", "Display Name", "Email", "Disabled", "Age"]
    assert columns[0]["format"] == "name" and columns[4]["type"] == "boolean" and columns[5]["type"] == "date"
    assert all(set(column) == {"name", "type", "format", "description", "priority"} for column in columns)
    assert [row["cells"] for row in table["rows"]] == [["jane", "jane", "Jane", "jane@example.com", False, "2d4h"],
                                                       ["bob", "bob", "Bob", None, True, "2d4h"]]
    assert table["rows"][0]["object"] == {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                          "metadata": user("jane")["metadata"]}


def test_table_include_object_modes():
    assert USERS is not None
    whole = schema.table(USERS, [user()], include_object="Object", list_meta={}, now=NOW)
    assert whole["rows"][0]["object"] == user()
    bare = schema.table(USERS, [user()], include_object="None", list_meta={}, now=NOW)
    assert "object" not in bare["rows"][0]
    with pytest.raises(ValueError):
        schema.table(USERS, [user()], include_object="Everything", list_meta={})


def test_other_tables():
    team = {"metadata": {"name": "devs", "creationTimestamp": CREATED}, "spec": {"displayName": "Devs", "users": ["a", "b"]}}
    teams = schema.resource("teams")
    assert teams is not None and CLUSTERS is not None and KEYS is not None
    assert schema.table(teams, [team], list_meta={}, now=NOW)["rows"][0]["cells"] == ["devs", "Devs", "a,b", "2d4h"]
    cluster = {"metadata": {"name": "prod"}, "spec": {}, "status": {"phase": "Ready", "kubernetesVersion": "v1.30.2",
                                                                     "latencySeconds": 0.0123}}
    table = schema.table(CLUSTERS, [cluster], list_meta={}, now=NOW)
    assert [column["name"] for column in table["columnDefinitions"]] == ["Name", "Phase", "Version", "Latency", "Age"]
    assert table["rows"][0]["cells"] == ["prod", "Ready", "v1.30.2", "12ms", "<unknown>"]
    key = {"metadata": {"name": "laptop", "creationTimestamp": CREATED}, "spec": {"type": "User", "user": "jane", "disabled": False}}
    assert schema.table(KEYS, [key], list_meta={}, now=NOW)["rows"][0]["cells"] == ["laptop", "User", "jane", None, None, False, "2d4h"]
    selves = schema.resource("selves")
    assert selves is not None and [column.name for column in selves.columns] == ["Name", "Age"]


# --- real kubectl ------------------------------------------------------------------------------------

KUBECTL = "/usr/bin/kubectl"
KUBECTL_1_27 = "/usr/lib/google-cloud-sdk/bin/kubectl.1.27"
PREFIX = "/kubernetes/management"
DISCOVERY_TYPE = "application/json;g=apidiscovery.k8s.io;v={};as=APIGroupDiscoveryList"
NOT_FOUND = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}


class Handler(BaseHTTPRequestHandler):
    """The documents under the gateway's path prefix, two users, and creates that answer what they validate."""
    requests: list[str]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        path = urlsplit(self.path).path.removeprefix(PREFIX)
        accept = self.headers.get("Accept", "")
        form = schema.discovery_form(accept)
        if not urlsplit(self.path).path.startswith(PREFIX + "/"):
            self.reply(404, NOT_FOUND)
        elif path in ("/api", "/apis") and form:
            self.reply(200, schema.aggregated_discovery(form, legacy=path == "/api"), DISCOVERY_TYPE.format(form))
        elif path == "/openapi/v2":
            self.reply(200, *schema.openapi_v2(accept))
        elif path == "/openapi/v3/apis/management.loft.sh/v1":
            self.reply(200, schema.openapi_v3_group())
        elif path == "/apis/management.loft.sh/v1/users" and schema.table_asked(accept):
            assert USERS is not None
            self.reply(200, schema.table(USERS, [user("jane"), user("bob")], list_meta={"resourceVersion": "7"}),
                       "application/json;as=Table;v=v1;g=meta.k8s.io")
        else:
            documents = {"/version": schema.version_info, "/api": schema.api_versions, "/apis": schema.api_group_list,
                         "/apis/management.loft.sh": schema.api_group, "/apis/management.loft.sh/v1": schema.api_resource_list,
                         "/openapi/v3": schema.openapi_v3_index}
            document = documents.get(path)
            if document is None:
                self.reply(404, NOT_FOUND)
            else:
                self.reply(200, document())

    def do_POST(self) -> None:
        self.requests.append(self.path)
        resource = schema.resource(urlsplit(self.path).path.rsplit("/", 1)[1])
        obj = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert resource is not None
        found = schema.validate(resource, obj, for_create=True)
        if found:
            self.reply(422, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
                             "message": "; ".join(f"{cause.field}: {cause.message}" for cause in found)})
        else:
            self.reply(201, obj)

    def reply(self, code: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class Server:
    def __init__(self, url: str, requests: list[str], home: Path):
        self.url, self.requests, self.home = url, requests, home
        self.runs = itertools.count()

    def kubectl(self, *args: str, binary: str = KUBECTL, input: str | None = None) -> str:
        if not os.access(binary, os.X_OK):
            pytest.skip(f"{binary} is not installed")
        cache = self.home / f"cache-{next(self.runs)}"  # a fresh discovery cache per run
        result = subprocess.run([binary, "--server", self.url + PREFIX, "--token", "x", "--cache-dir", str(cache),
                                 "--request-timeout=15s", *args], capture_output=True, text=True, input=input, timeout=60,
                                env={**os.environ, "HOME": str(self.home), "KUBECONFIG": str(self.home / "none")})
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    requests: list[str] = []
    handler = type("RecordingHandler", (Handler,), {"requests": requests})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}", requests, tmp_path_factory.mktemp("kubectl"))
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.e2e
def test_kubectl_api_resources(server):
    server.requests.clear()
    out = server.kubectl("api-resources", "-o", "wide")
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    for resource in RESOURCES:
        row = rows[resource.plural]
        assert resource.kind in row and "management.loft.sh/v1" in row and ",".join(resource.verbs) in row
    # The aggregated documents were enough: no group version was fetched on top.
    assert not any(path.startswith(PREFIX + "/apis/management.loft.sh/v1") for path in server.requests)


@pytest.mark.e2e
@pytest.mark.parametrize("binary", [KUBECTL, KUBECTL_1_27])
def test_kubectl_explain(server, binary):
    out = server.kubectl("explain", "users.spec", binary=binary)
    for name in schema.USER_SPEC.properties:
        assert name in out
    assert "The user's email address." in out and "<[]string>" in out
    scope = server.kubectl("explain", "ownedaccesskeys.spec.scope", binary=binary)
    assert "<AccessKeyScope>" in scope and "clusters\t<[]AccessKeyScopeCluster>" in scope and "allowLoftCli" in scope
    assert "verbs" in server.kubectl("explain", "ownedaccesskeys.spec.scope.rules", binary=binary)


@pytest.mark.e2e
def test_kubectl_get_prints_the_table(server):
    lines = server.kubectl("get", "users").splitlines()
    assert lines[0].split() == ["NAME", "USERNAME", "DISPLAY", "NAME", "EMAIL", "DISABLED", "AGE"]
    assert lines[1].split()[:5] == ["jane", "jane", "Jane", "jane@example.com", "false"]


@pytest.mark.e2e
@pytest.mark.parametrize("binary", [KUBECTL, KUBECTL_1_27])
def test_kubectl_create_and_apply_validate_without_flags(server, binary):
    """kubectl sends fieldValidation=Strict for users (the PATCH operation declares it) and accepts that
    selves, with no PATCH, are validated by the server; what it sends passes validate()."""
    manifest = textwrap.dedent("""\
        apiVersion: management.loft.sh/v1
        kind: User
        metadata:
          name: carol
          labels: {team: platform}
        spec:
          displayName: Carol
          groups: [platform]
    """)
    server.requests.clear()
    assert "user.management.loft.sh/carol created" in server.kubectl("create", "-f", "-", input=manifest, binary=binary)
    assert "user.management.loft.sh/carol created" in server.kubectl("apply", "-f", "-", input=manifest, binary=binary)
    created = server.kubectl("create", "-o", "json", "-f", "-", binary=binary,
                             input="apiVersion: management.loft.sh/v1\nkind: Self\nmetadata: {}\nspec: {}\n")
    assert json.loads(created)["kind"] == "Self"
    posts = [path for path in server.requests if "/users?" in path]
    assert posts and all("fieldValidation=Strict" in path for path in posts)
