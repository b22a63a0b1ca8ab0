"""The decisions of `fastproxy kubeconfig`: names, URLs, the file chosen, the merge."""
from __future__ import annotations

import os
import stat

import pytest

from fastproxy.config import ConfigError
from fastproxy.kubeconfig import Entry, Target, kubeconfig_path, merge, parse_server, parse_target, write_atomically


def test_context_names_and_paths_are_those_of_loft_use():
    assert (Target("prod").context_name, Target("prod").path) == ("loft_prod", "/kubernetes/cluster/prod")
    virtual = Target("prod", ("team-a", "dev"))
    assert virtual.context_name == "loft-vcluster_dev_team-a_prod"
    assert virtual.path == "/kubernetes/virtualcluster/prod/team-a/dev"
    assert (Target().context_name, Target().path) == ("loft-management", "/kubernetes/management")


@pytest.mark.parametrize("value, expected", [
    ("https://gw.example.com", "https://gw.example.com"),
    ("https://gw.example.com:8443/", "https://gw.example.com:8443"),
    ("https://[::1]:8443", "https://[::1]:8443"),
])
def test_server_is_the_gateways_base_url(value, expected):
    assert parse_server(value) == expected


@pytest.mark.parametrize("value", ["http://gw", "gw.example.com", "https://", "https://gw/kubernetes",
                                   "https://gw?x=1", "https://user@gw", "https://gw:99999", "https://gw#top"])
def test_bad_server_names_the_flag(value):
    with pytest.raises(ConfigError, match=r"^--server: must be an https://HOST\[:PORT\] URL"):
        parse_server(value)


@pytest.mark.parametrize("cluster, virtual, management, flag", [
    (None, None, False, "--cluster: is required"),
    ("Prod", None, False, "--cluster: must be a lower-case DNS name"),
    ("prod", "dev", False, "--virtual-cluster: must be NAMESPACE/NAME"),
    ("prod", "a/B", False, "--virtual-cluster: must be NAMESPACE/NAME"),
    ("prod", None, True, "--management: cannot be combined"),
    (None, "a/b", True, "--management: cannot be combined"),
])
def test_bad_target_names_the_flag(cluster, virtual, management, flag):
    with pytest.raises(ConfigError, match="^" + flag):
        parse_target(cluster, virtual, management)


def test_the_first_kubeconfig_entry_is_written_as_kubectl_does():
    assert kubeconfig_path({"KUBECONFIG": f"{os.pathsep}/a/one{os.pathsep}/a/two"}, "/home/x") == "/a/one"
    assert kubeconfig_path({"KUBECONFIG": ""}, "/home/x") == "/home/x/.kube/config"
    assert kubeconfig_path({}, "/home/x") == "/home/x/.kube/config"


ENTRY = Entry("loft_prod", "https://gw/kubernetes/cluster/prod", "key-1", ca_data="Q0E=")


def test_merge_into_nothing_is_a_whole_kubeconfig():
    document = merge(None, ENTRY, "f")
    assert document == {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "loft_prod", "cluster": {"server": "https://gw/kubernetes/cluster/prod",
                                                       "certificate-authority-data": "Q0E="}}],
        "users": [{"name": "loft_prod", "user": {"token": "key-1"}}],
        "contexts": [{"name": "loft_prod", "context": {"cluster": "loft_prod", "user": "loft_prod"}}],
        "current-context": "loft_prod"}


def test_merge_keeps_other_entries_and_unknown_fields_and_replaces_its_own():
    other = {"name": "kind", "cluster": {"server": "https://k", "extensions": [{"name": "x", "extension": {}}]}}
    existing = {"apiVersion": "v1", "kind": "Config", "preferences": {"colors": True}, "current-context": "kind",
                "clusters": [other], "users": [{"name": "kind", "user": {"token": "t"}}], "contexts": None}
    once = merge(existing, ENTRY, "f")
    again = merge(once, Entry("loft_prod", "https://gw2/kubernetes/cluster/prod", "key-2"), "f")
    assert again["preferences"] == {"colors": True} and again["current-context"] == "loft_prod"
    assert again["clusters"] == [other, {"name": "loft_prod", "cluster": {"server": "https://gw2/kubernetes/cluster/prod"}}]
    assert again["users"] == [{"name": "kind", "user": {"token": "t"}}, {"name": "loft_prod", "user": {"token": "key-2"}}]
    assert [c["name"] for c in again["contexts"]] == ["loft_prod"]
    assert existing["clusters"] == [other], "the loaded document is not changed in place"


def test_insecure_is_written_only_when_asked():
    assert "insecure-skip-tls-verify" not in merge(None, ENTRY, "f")["clusters"][0]["cluster"]
    insecure = Entry("loft_prod", "https://gw/kubernetes/cluster/prod", "k", insecure_skip_tls_verify=True)
    assert merge(None, insecure, "f")["clusters"][0]["cluster"]["insecure-skip-tls-verify"] is True


@pytest.mark.parametrize("document, message", [
    ([1, 2], "f: is not a kubeconfig"),
    ({"users": {"a": 1}}, "f: users: must be a list"),
])
def test_a_file_that_is_not_a_kubeconfig_is_refused(document, message):
    with pytest.raises(ConfigError, match="^" + message):
        merge(document, ENTRY, "f")


def test_write_replaces_the_file_through_a_link_with_mode_0600(tmp_path):
    real = tmp_path / "real-config"
    real.write_text("old")
    real.chmod(0o644)
    link = tmp_path / "kube" / "config"
    link.parent.mkdir()
    link.symlink_to(real)
    write_atomically(str(link), "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kube", "real-config"], "no temporary file left"
    write_atomically(str(tmp_path / "fresh" / "config"), "x")
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700
