"""`[state] backend = "etcd"` in the configuration, and `fastproxy state migrate` from SQLite into a real etcd."""
from __future__ import annotations

import pytest

from fastproxy.cli import main
from fastproxy.config import ConfigError, EtcdConfig, load_config
from fastproxy.store.base import NamespaceActivity
from fastproxy.store.etcd import EtcdStore
from fastproxy.store.sqlite import SqliteStore
from tests.test_config import files, good, write  # noqa: F401 (files is a fixture)


def etcd_config_text(tls, state: str) -> str:
    return good(tls) + "\n[state]\nbackend = \"etcd\"\n" + state


def test_an_etcd_state_reads_endpoints_tls_prefix_and_timeouts(files):  # noqa: F811
    tmp, tls = files
    (tmp / "etcd").mkdir()
    for name in ("ca.pem", "client.pem", "client.key"):
        (tmp / "etcd" / name).write_text("x")
    config = load_config(write(tmp, etcd_config_text(tls, """
        endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
        prefix = "/fleet-eu/"
        ca_file = "etcd/ca.pem"
        cert_file = "etcd/client.pem"
        key_file = "etcd/client.key"
        timeout = 2
        max_staleness = 30
    """)))
    assert config.state.backend == "etcd" and config.state.path == ""
    assert config.state.etcd == EtcdConfig(("https://10.0.0.1:2379", "https://10.0.0.2:2379"), "/fleet-eu/",
                                           str(tmp / "etcd/ca.pem"), str(tmp / "etcd/client.pem"),
                                           str(tmp / "etcd/client.key"), 2.0, 30.0)
    defaults = load_config(write(tmp, etcd_config_text(tls, 'endpoints = ["http://127.0.0.1:2379"]'))).state.etcd
    assert (defaults.prefix, defaults.timeout, defaults.max_staleness) == ("/fastproxy/", 5.0, 60.0)


@pytest.mark.parametrize("state, message", [
    ("", "state.endpoints: is required with backend = \"etcd\""),
    ('endpoints = ["10.0.0.1:2379"]', "state.endpoints: '10.0.0.1:2379' is not http(s)://host:port"),
    ('endpoints = ["http://h:2379"]\nprefix = "fleet"', "state.prefix: must end with '/', not 'fleet'"),
    ('endpoints = ["http://h:2379"]\ntimeout = 0', "state.timeout: must be > 0, not 0.0"),
    ('endpoints = ["http://h:2379"]\nmax_staleness = -1', "state.max_staleness: must be >= 0, not -1.0"),
    ('endpoints = ["http://h:2379"]\nca_file = "nope.pem"', "state.ca_file: file not found"),
    ('endpoints = ["http://h:2379"]\npath = "x.db"', "state.path: unknown key"),
])
def test_bad_etcd_settings_name_their_key(files, state, message):  # noqa: F811
    tmp, tls = files
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp, etcd_config_text(tls, state)))
    assert str(error.value).startswith(message)


def test_migrate_copies_everything_once_and_verifies(files, etcd, etcd_config, capsys):  # noqa: F811
    tmp, tls = files
    source = SqliteStore(tmp / "state.db")
    alice = source.create_user("alice", groups=["devs"])
    source.create_user("bob")
    source.create_team("ops", members=["alice", "bob"])
    key, secret = source.create_access_key(user="alice", name="laptop")
    source.create_access_key(team="ops", name="ci")
    source.record_activity({"laptop": 1_800_000_000.0})
    source.record_namespace_activity({("prod", "team-a"): NamespaceActivity("prod", "team-a", 1_800_000_000.0, verb="get")})
    source.revoke_token("jti-1", 4_000_000_000.0)
    source.close()
    endpoints = ", ".join(f'"{endpoint}"' for endpoint in etcd.endpoints)
    config = write(tmp, etcd_config_text(tls, f'endpoints = [{endpoints}]\nprefix = "{etcd_config.prefix}"'))
    argv = ["state", "migrate", "--from", f"sqlite:{tmp / 'state.db'}", "--to", "etcd", "--config", str(config)]
    for _ in range(2):  # the second run finds everything there and changes nothing
        assert main(argv) == 0
        assert capsys.readouterr().out == "in etcd: 2 users, 1 teams, 2 access keys, 1 revoked tokens\n"
    target = EtcdStore(etcd_config)
    try:
        snapshot = target.load_snapshot()
        assert target.get_user("alice").uid == alice.uid
        assert snapshot.resolve(secret, 1_800_000_001.0).access_key.uid == key.uid  # the digest came along
        assert snapshot.access_keys["laptop"].last_activity == 1_800_000_000.0
        assert snapshot.teams["ops"].members == ("alice", "bob")
        assert snapshot.revoked_tokens == {"jti-1"}
        assert target.list_namespace_activity()[0].verb == "get"
        target.delete_user("bob")
        target.create_user("bob")  # another bob: the file's bob is not copied over him
    finally:
        target.close()
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("fastproxy: error: user 'bob' exists in etcd as another object") and error.count("\n") == 1
    assert main([*argv[:3], "mysql:x", *argv[4:]]) == 2
    assert capsys.readouterr().err == "fastproxy: error: --from: 'mysql:x' is not sqlite:PATH\n"
