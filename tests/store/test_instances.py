"""Virtual cluster instances in the SQLite store: checks, versions, the write-only token, snapshots."""
from __future__ import annotations

import base64

import pytest

from devcluster.certs import ensure_credentials
from fastproxy.store import AlreadyExistsError, ConflictError, InvalidError, NotFoundError
from fastproxy.store.base import check_server_url, check_token


def test_create_update_delete_and_the_snapshot(store):
    created = store.create_virtual_cluster_instance("team-a", "vc1", cluster="prod", display_name="One")
    assert (created.namespace, created.name, created.cluster, created.server) == ("team-a", "vc1", "prod", "")
    assert created.uid and created.resource_version > 0
    snapshot = store.load_snapshot()
    assert snapshot.virtual_cluster_instances[("team-a", "vc1")] == created
    assert snapshot.version == created.resource_version
    # The same name in another namespace is another instance.
    store.create_virtual_cluster_instance("team-b", "vc1", cluster="prod")
    with pytest.raises(AlreadyExistsError, match="team-a/vc1 already exists"):
        store.create_virtual_cluster_instance("team-a", "vc1", cluster="prod")
    updated = store.update_virtual_cluster_instance("team-a", "vc1", description="changed",
                                                    expected_version=created.resource_version)
    assert updated.description == "changed" and updated.resource_version > created.resource_version
    assert store.update_virtual_cluster_instance("team-a", "vc1", description="changed") == updated  # no change
    with pytest.raises(ConflictError):
        store.update_virtual_cluster_instance("team-a", "vc1", description="x", expected_version=created.resource_version)
    deleted = store.delete_virtual_cluster_instance("team-a", "vc1")
    assert deleted.resource_version > updated.resource_version
    assert list(store.load_snapshot().virtual_cluster_instances) == [("team-b", "vc1")]
    with pytest.raises(NotFoundError):
        store.delete_virtual_cluster_instance("team-a", "vc1")


def test_a_token_is_kept_until_changed_and_never_shown_in_repr(store, tmp_path):
    ca = base64.b64encode(ensure_credentials(tmp_path / "tls").ca_file.read_bytes()).decode()
    created = store.create_virtual_cluster_instance("team-a", "vc1", cluster="prod", server="https://vc.example:6443",
                                                    ca_data=ca, token="s3cret-token")
    assert "s3cret-token" not in repr(created)
    kept = store.update_virtual_cluster_instance("team-a", "vc1", description="still")
    assert kept.token == "s3cret-token" and kept.ca_data == ca
    assert store.update_virtual_cluster_instance("team-a", "vc1", token="").token == ""


@pytest.mark.parametrize("fields, says", [
    ({"cluster": "Prod"}, "host cluster name 'Prod' is not valid"),
    ({"cluster": "prod", "token": "abc"}, "caData and token need a server"),
    ({"cluster": "prod", "server": "https://vc.example", "ca_data": "bm90IGEgY2VydA=="}, "caData is not base64 of PEM"),
    ({"cluster": "prod", "server": "https://vc.example", "token": "two\r\nlines"}, "token is not printable ASCII"),
])
def test_what_the_store_refuses(store, fields, says):
    with pytest.raises(InvalidError, match=says):
        store.create_virtual_cluster_instance("team-a", "vc1", **fields)
    assert store.list_virtual_cluster_instances() == []


@pytest.mark.parametrize("url", ["http://vc.example", "https://", "https://vc.example/prefix", "https://u:p@vc.example",
                                 "https://vc.example:99999", "https://vc.example?x=1", "ftp://vc.example", 7])
def test_server_urls_refused(url):
    with pytest.raises(InvalidError):
        check_server_url(url)


def test_server_urls_taken():
    assert check_server_url("") == ""
    assert check_server_url("https://10.0.0.1:6443") == "https://10.0.0.1:6443"
    assert check_server_url("https://[::1]:6443/") == "https://[::1]:6443/"


def test_a_refused_token_is_not_quoted():
    with pytest.raises(InvalidError) as refused:
        check_token("secret with spaces")
    assert "secret" not in str(refused.value)
