"""`fastproxy token issue|jwks|revoke`: output, and one-line errors with status 2."""
from __future__ import annotations

import json
import textwrap

import jwt
import pytest

from fastproxy.auth.tokens import RevocationList, TokenVerifier
from fastproxy.cli import main
from fastproxy.store.sqlite import SqliteStore

CONFIG = """
    [[clusters]]
    name = "prod"
    server = "https://10.0.0.1:6443"
    token_file = "token"

    [[access_keys]]
    name = "ci"
    key_sha256 = "{digest}"
    user = "ci-bot"
    groups = ["ci", "deployers"]
"""
TOKENS = """
    [tokens]
    issuer = "https://gw.example"
    signing_keys_dir = "keys"
    revocation_file = "revoked.txt"
"""


def write_config(folder, *sections: str) -> str:
    (folder / "token").write_text("t\n")
    path = folder / "fastproxy.toml"
    path.write_text(textwrap.dedent(CONFIG.format(digest="ab" * 32)) + "".join(map(textwrap.dedent, sections)))
    return str(path)


def ok(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr()


def refused(capsys, *argv) -> str:
    try:
        status = main(list(argv))
    except SystemExit as exit:
        status = exit.code
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def claims(token: str) -> dict:
    return jwt.decode(token, options={"verify_signature": False})


def test_issue_for_a_static_key_user_verifies_with_the_published_jwks(capsys, tmp_path):
    config = write_config(tmp_path, TOKENS)
    issued = ok(capsys, "token", "issue", "--config", config, "--user", "ci-bot", "--cluster", "prod", "--ttl", "90")
    token = issued.out.strip()
    jwks = json.loads(ok(capsys, "token", "jwks", "--config", config).out)
    verified = TokenVerifier(jwks, "https://gw.example").verify(token, "prod")
    assert (verified.identity.user, verified.identity.groups) == ("ci-bot", ("ci", "deployers"))
    assert verified.expires_at - verified.issued_at == 90 and verified.identity.scope is None
    assert issued.err.startswith(f"jti: {verified.jti}, expires 20")
    assert all("d" not in key for key in jwks["keys"])  # public halves only


def test_issue_for_a_state_file_user_carries_team_groups_and_a_scope(capsys, tmp_path):
    store = SqliteStore(tmp_path / "state.db")
    store.create_user("alice", subject="alice@corp", groups=["devs"])
    store.create_team("ops", members=["alice"], groups=["oncall"])
    store.close()
    config = write_config(tmp_path, '[state]\npath = "state.db"\n', TOKENS)
    (tmp_path / "scope.json").write_text('{"clusters": [{"cluster": "prod"}]}')
    token = ok(capsys, "token", "issue", "--config", config, "--user", "alice", "--cluster", "prod",
               "--scope", str(tmp_path / "scope.json")).out.strip()
    payload = claims(token)
    assert payload["sub"] == "alice@corp" and payload["aud"] == ["prod"] and payload["exp"] - payload["iat"] == 3600
    assert payload["groups"] == ["devs", "oncall", "loft:team:ops", "system:authenticated", "loft:authenticated",
                                 "loft:user:alice"]
    assert payload["scope"] == {"clusters": [{"cluster": "prod"}]}


@pytest.mark.parametrize("argv,message", [
    (["--user", "ci-bot", "--cluster", "staging"], "fastproxy: --cluster: no cluster named 'staging' in {config}"),
    (["--user", "ci-bot", "--cluster", "prod", "--ttl", "0"],
     "fastproxy: --ttl: must be between 1 and 2592000 seconds, not 0"),
    (["--user", "nobody", "--cluster", "prod"], "fastproxy: --user: no [[access_keys]] entry for user 'nobody' in {config}"),
    (["--user", "ci-bot", "--cluster", "prod", "--scope", "{folder}/missing.json"],
     "fastproxy: --scope: {folder}/missing.json: No such file or directory"),
    (["--user", "ci-bot", "--cluster", "prod", "--scope", "{folder}/bad.json"],
     "fastproxy: --scope: {folder}/bad.json: scope: unknown key 'cluster'"),
    (["--user", "ci-bot"], "fastproxy token issue: the following arguments are required: --cluster"),
])
def test_issue_errors(capsys, tmp_path, argv, message):
    config = write_config(tmp_path, TOKENS)
    (tmp_path / "bad.json").write_text('{"cluster": "prod"}')
    paths = {"config": config, "folder": str(tmp_path)}
    argv = [part.format(**paths) for part in argv]
    assert refused(capsys, "token", "issue", "--config", config, *argv) == message.format(**paths)


def test_issue_refuses_a_disabled_user(capsys, tmp_path):
    store = SqliteStore(tmp_path / "state.db")
    store.create_user("carol")
    store.disable_user("carol")
    store.close()
    config = write_config(tmp_path, '[state]\npath = "state.db"\n', TOKENS)
    assert refused(capsys, "token", "issue", "--config", config, "--user", "carol", "--cluster", "prod") == (
        "fastproxy: --user: user 'carol' is disabled")


@pytest.mark.parametrize("command", [["issue", "--user", "ci-bot", "--cluster", "prod"], ["jwks"]])
def test_signing_needs_a_key_directory(capsys, tmp_path, command):
    (tmp_path / "jwks.json").write_text('{"keys": [{"kid": "k", "alg": "RS256"}]}')
    config = write_config(tmp_path, '[tokens]\nissuer = "x"\njwks_file = "jwks.json"\n')
    assert refused(capsys, "token", *command, "--config", config) == (
        f"fastproxy: --config: {config} has no [tokens] signing_keys_dir; this gateway does not sign tokens")


def test_revoke_writes_the_state_file_and_the_revocation_file(capsys, tmp_path):
    config = write_config(tmp_path, '[state]\npath = "state.db"\n', TOKENS)
    (tmp_path / "revoked.txt").write_text("# revoked tokens\nold-one")  # no final newline
    out = ok(capsys, "token", "revoke", "jti-1", "--config", config).out
    assert out == f"token jti-1 revoked in {tmp_path / 'state.db'}\ntoken jti-1 revoked in {tmp_path / 'revoked.txt'}\n"
    ok(capsys, "token", "revoke", "jti-1", "--config", config)  # twice: listed once
    assert RevocationList(tmp_path / "revoked.txt").ids == {"old-one", "jti-1"}
    assert (tmp_path / "revoked.txt").read_text() == "# revoked tokens\nold-one\njti-1\n"
    store = SqliteStore(tmp_path / "state.db")
    assert "jti-1" in store.load_snapshot().revoked_tokens
    store.close()


def test_revoke_keeps_a_json_revocation_list_json(capsys, tmp_path):
    config = write_config(tmp_path, TOKENS)
    (tmp_path / "revoked.txt").write_text('["a"]')
    ok(capsys, "token", "revoke", "b", "--config", config)
    assert json.loads((tmp_path / "revoked.txt").read_text()) == ["a", "b"]


@pytest.mark.parametrize("jti,sections,message", [
    ("a b", [TOKENS], "fastproxy: JTI: 'a b' is not a token id (letters, digits, '.', '_', ':' and '-')"),
    ("#x", [TOKENS], "fastproxy: JTI: '#x' is not a token id (letters, digits, '.', '_', ':' and '-')"),
    ("ok", [], "fastproxy: --config: {config} has neither a [state] path nor a [tokens] revocation_file"),
])
def test_revoke_errors(capsys, tmp_path, jti, sections, message):
    config = write_config(tmp_path, *sections)
    assert refused(capsys, "token", "revoke", jti, "--config", config) == message.format(config=config)
