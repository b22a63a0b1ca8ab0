"""The user / team / accesskey commands: output, and one-line errors with status 2."""
from __future__ import annotations

import os
import pty
import subprocess
import sys
import time

import pytest

from fastproxy.auth.passwords import password_matches
from fastproxy.store.commands import run
from fastproxy.store.sqlite import SqliteStore


@pytest.fixture
def state(tmp_path):
    return str(tmp_path / "state.db")


def ok(capsys, *argv):
    assert run(list(argv)) == 0
    return capsys.readouterr().out


def refused(capsys, *argv):
    """Run a command that must fail; returns its single stderr line."""
    try:
        status = run(list(argv))
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    assert status == 2
    assert "Traceback" not in captured.err
    assert captured.err.count("\n") == 1, captured.err
    return captured.err.strip()


def test_users(capsys, state):
    assert ok(capsys, "user", "create", "alice", "--email", "a@example.com", "--group", "devs", "--group", "ops",
              "--state", state) == "user alice created\n"
    ok(capsys, "user", "create", "bob", "--subject", "bob@corp", "--state", state)
    assert ok(capsys, "user", "disable", "bob", "--state", state) == "user bob disabled\n"
    assert ok(capsys, "user", "list", "--state", state).splitlines() == [
        "NAME   USERNAME  SUBJECT   EMAIL          GROUPS    DISABLED  PASSWORD",
        "alice  alice     alice     a@example.com  devs,ops  no        no",
        "bob    bob       bob@corp                           yes       no",
    ]


def set_password(state: str, name: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastproxy", "user", "set-password", name, "--state", state],
                          input=stdin, capture_output=True, text=True, timeout=30)


def test_set_password_reads_stdin_and_stores_only_a_hash(capsys, state):
    ok(capsys, "user", "create", "alice", "--state", state)
    done = set_password(state, "alice", "correct horse battery\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "user alice: password set\n", "")
    store = SqliteStore(state)
    hashed = store.get_user("alice").password_hash
    store.close()
    assert hashed.startswith("$argon2id$") and "correct horse" not in hashed
    assert password_matches(hashed, "correct horse battery") and not password_matches(hashed, "correct horse")
    with open(state, "rb") as file:
        assert b"correct horse" not in file.read()
    assert ok(capsys, "user", "list", "--state", state).splitlines()[1].split()[-1] == "yes"


@pytest.mark.parametrize(("name", "stdin", "message"), [
    ("alice", "short\n", "fastproxy: error: password: a password must have at least 8 characters"),
    ("alice", "", "fastproxy: error: password: a password must have at least 8 characters"),
    ("nobody", "long enough password\n", "fastproxy: error: user 'nobody' does not exist"),
])
def test_set_password_refusals(capsys, state, name, stdin, message):
    ok(capsys, "user", "create", "alice", "--state", state)
    done = set_password(state, name, stdin)
    assert (done.returncode, done.stderr) == (2, message + "\n")
    assert "password" not in stdin or stdin.strip() not in done.stderr


def test_teams(capsys, state):
    ok(capsys, "user", "create", "alice", "--state", state)
    assert ok(capsys, "team", "create", "ops", "--member", "alice", "--group", "oncall",
              "--state", state) == "team ops created\n"
    assert ok(capsys, "team", "list", "--state", state).splitlines() == [
        "NAME  MEMBERS  GROUPS", "ops   alice    oncall"]


def test_access_keys(capsys, state, tmp_path):
    ok(capsys, "user", "create", "alice", "--state", state)
    scope = tmp_path / "scope.json"
    scope.write_text('{"clusters": [{"cluster": "prod"}]}')
    assert run(["accesskey", "create", "--user", "alice", "--name", "ci", "--ttl", "3600", "--scope", str(scope),
                "--type", "Other", "--display-name", "CI", "--state", state]) == 0
    captured = capsys.readouterr()
    name_line, key_line = captured.out.splitlines()
    assert name_line == "name: ci"
    assert captured.err == "the key is shown only this once\n"
    secret = key_line.removeprefix("key: ")
    store = SqliteStore(state)
    resolved = store.load_snapshot().resolve(secret, time.time())
    assert resolved.identity.user == "alice"
    assert (resolved.access_key.type, resolved.access_key.display_name, resolved.access_key.ttl) == ("Other", "CI", 3600)
    assert resolved.identity.scope.source.to_dict() == {"clusters": [{"cluster": "prod"}]}
    store.close()

    ok(capsys, "accesskey", "create", "--user", "alice", "--name", "idle", "--ttl-after-last-activity", "60",
       "--state", state)
    listing = ok(capsys, "accesskey", "list", "--state", state).splitlines()
    assert listing[0].split() == ["NAME", "TYPE", "OWNER", "EXPIRES", "LAST-ACTIVITY", "DISABLED", "SCOPED"]
    assert listing[1].split()[:3] == ["ci", "Other", "user/alice"] and listing[1].split()[4:] == ["-", "no", "yes"]
    assert listing[2].split()[:3] == ["idle", "User", "user/alice"] and listing[2].split()[-1] == "no"
    assert ok(capsys, "accesskey", "revoke", "ci", "--state", state) == "access key ci revoked\n"
    assert [line.split()[0] for line in ok(capsys, "accesskey", "list", "--state", state).splitlines()] == [
        "NAME", "idle"]


def test_team_key(capsys, state):
    ok(capsys, "user", "create", "alice", "--state", state)
    ok(capsys, "team", "create", "ops", "--member", "alice", "--state", state)
    out = ok(capsys, "accesskey", "create", "--team", "ops", "--state", state)
    assert out.startswith("name: ops-")
    assert ok(capsys, "accesskey", "list", "--state", state).splitlines()[1].split()[:4] == [
        out.split()[1], "User", "team/ops", "never"]


@pytest.mark.parametrize("argv, message", [
    (["user", "create", "alice"], "fastproxy: error: --state: required (or --config FILE with a [state] path)"),
    (["user", "create", "Alice", "--state", "{state}"],
     "fastproxy: error: user name 'Alice' is not valid: use lower-case letters, digits, '-' and '.'"),
    (["user", "create", "bob", "--group", "a\nb", "--state", "{state}"],
     "fastproxy: error: group 'a\\nb' must be non-empty, without CR, LF, NUL or other control characters and "
     "without leading or trailing spaces"),
    (["user", "create", "alice", "--state", "{state}"], "fastproxy: error: user 'alice' already exists"),
    (["user", "disable", "ghost", "--state", "{state}"], "fastproxy: error: user 'ghost' does not exist"),
    (["user", "frobnicate", "--state", "{state}"],
     "fastproxy user: error: argument COMMAND: invalid choice: 'frobnicate' (choose from 'create', 'list', 'disable', 'set-password')"),
    (["team", "create", "ops", "--member", "ghost", "--state", "{state}"],
     "fastproxy: error: team member 'ghost' is not a user"),
    (["accesskey", "create", "--state", "{state}"],
     "fastproxy accesskey create: error: one of the arguments --user --team is required"),
    (["accesskey", "create", "--user", "alice", "--team", "ops", "--state", "{state}"],
     "fastproxy accesskey create: error: argument --team: not allowed with argument --user"),
    (["accesskey", "create", "--user", "ghost", "--state", "{state}"], "fastproxy: error: user 'ghost' does not exist"),
    (["accesskey", "create", "--user", "alice", "--ttl", "-5", "--state", "{state}"],
     "fastproxy accesskey create: error: argument --ttl: '-5' is not a whole number of seconds"),
    (["accesskey", "create", "--user", "alice", "--ttl", "5", "--ttl-after-last-activity", "5", "--state", "{state}"],
     "fastproxy accesskey create: error: argument --ttl-after-last-activity: not allowed with argument --ttl"),
    (["accesskey", "create", "--user", "alice", "--type", "Reset", "--state", "{state}"],
     "fastproxy accesskey create: error: argument --type: invalid choice: 'Reset' (choose from 'Login', 'User', 'Other')"),
    (["accesskey", "create", "--user", "alice", "--scope", "{missing}", "--state", "{state}"],
     "fastproxy: error: --scope {missing}: No such file or directory"),
    (["accesskey", "create", "--user", "alice", "--scope", "{bad_scope}", "--state", "{state}"],
     "fastproxy: error: --scope {bad_scope}: scope: unknown key 'rules[0].verb'"),
    (["accesskey", "revoke", "ghost", "--state", "{state}"], "fastproxy: error: access key 'ghost' does not exist"),
    (["user", "list", "--state", "{not_db}"], "fastproxy: error: cannot open state file {not_db}: file is not a database"),
    (["user", "list", "--state", "{no_dir}"],
     "fastproxy: error: cannot open state file {no_dir}: unable to open database file"),
])
def test_errors_are_one_line_with_status_2(capsys, state, tmp_path, argv, message):
    paths = {"state": state, "missing": str(tmp_path / "missing.json"), "bad_scope": str(tmp_path / "bad.json"),
             "not_db": str(tmp_path / "not.db"), "no_dir": str(tmp_path / "no" / "state.db")}
    (tmp_path / "bad.json").write_text('{"rules": [{"verb": ["get"]}]}')
    (tmp_path / "not.db").write_text("hello, this is not a database file at all")
    ok(capsys, "user", "create", "alice", "--state", state)
    assert refused(capsys, *[part.format(**paths) for part in argv]) == message.format(**paths)


def test_through_a_subprocess(state):
    create = subprocess.run([sys.executable, "-m", "fastproxy.store.commands", "user", "create", "alice",
                             "--state", state], capture_output=True, text=True)
    assert (create.returncode, create.stdout, create.stderr) == (0, "user alice created\n", "")
    again = subprocess.run([sys.executable, "-m", "fastproxy.store.commands", "user", "create", "alice",
                            "--state", state], capture_output=True, text=True)
    assert (again.returncode, again.stdout, again.stderr) == (2, "", "fastproxy: error: user 'alice' already exists\n")


def test_state_defaults_to_the_configs_state_path(capsys, tmp_path):
    (tmp_path / "token").write_text("t\n")
    config = tmp_path / "fastproxy.toml"
    config.write_text('[state]\npath = "state.db"\n\n[[clusters]]\nname = "prod"\n'
                      'server = "https://10.0.0.1:6443"\ntoken_file = "token"\n')
    ok(capsys, "user", "create", "alice", "--config", str(config))
    secret = ok(capsys, "accesskey", "create", "--user", "alice", "--name", "k", "--config", str(config)).split()[-1]
    assert ok(capsys, "accesskey", "disable", "k", "--config", str(config)) == "access key k disabled\n"
    store = SqliteStore(tmp_path / "state.db")  # relative to the configuration file
    assert [key.disabled for key in store.list_access_keys()] == [True]
    assert store.load_snapshot().resolve(secret, time.time()) is None
    store.close()


@pytest.mark.parametrize("config_text,message", [
    ('[[clusters]]\nname = "prod"\nserver = "https://10.0.0.1:6443"\ntoken_file = "token"\n',
     "fastproxy: error: --config: {config} has no [state] path; give --state"),
    ('[state]\npath = "nowhere/state.db"\n', "fastproxy: error: --config: state.path: folder not found: "),
])
def test_a_config_without_a_usable_state_path_is_refused(capsys, tmp_path, config_text, message):
    (tmp_path / "token").write_text("t\n")
    config = tmp_path / "fastproxy.toml"
    config.write_text(config_text)
    assert refused(capsys, "user", "list", "--config", str(config)).startswith(message.format(config=config))


def test_disable_an_unknown_key(capsys, state):
    assert refused(capsys, "accesskey", "disable", "ghost", "--state", state) == (
        "fastproxy: error: access key 'ghost' does not exist")


def test_activity_list_shows_the_latest_first(tmp_path, capsys):
    from fastproxy.store import NamespaceActivity

    store = SqliteStore(tmp_path / "state.db")
    store.record_namespace_activity({
        ("prod", "a"): NamespaceActivity("prod", "a", 1_000_000.0, "alice", "get", "", "pods", "log", "web"),
        ("prod", "b"): NamespaceActivity("prod", "b", 2_000_000.0, "bob", "list", "apps", "deployments")})
    store.close()
    assert run(["activity", "list", "--state", str(tmp_path / "state.db")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["CLUSTER", "NAMESPACE", "LAST-ACTIVITY", "SUBJECT", "VERB", "RESOURCE"]
    assert lines[1].split() == ["prod", "b", "1970-01-24T03:33:20Z", "bob", "list", "deployments"]
    assert lines[2].split() == ["prod", "a", "1970-01-12T13:46:40Z", "alice", "get", "pods/log"]


def test_set_password_asks_twice_on_a_terminal(capsys, state):
    ok(capsys, "user", "create", "alice", "--state", state)

    def on_a_terminal(*answers: str) -> tuple[int, str]:
        pid, fd = pty.fork()
        if pid == 0:
            try:
                os.execv(sys.executable, [sys.executable, "-m", "fastproxy", "user", "set-password", "alice",
                                          "--state", state])
            finally:
                os._exit(127)
        output = b""
        for prompt, answer in zip((b"New password: ", b"Again: "), answers):
            while not output.endswith(prompt):  # getpass flushes what was typed before it asks
                output += os.read(fd, 1024)
            os.write(fd, answer.encode() + b"\n")
        while True:
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), output.decode()

    code, output = on_a_terminal("typed-on-a-tty-1", "typed-on-a-tty-2")
    assert code == 2 and "password: the two entries differ" in output and "typed-on-a-tty" not in output
    code, output = on_a_terminal("typed-on-a-tty-1", "typed-on-a-tty-1")
    assert code == 0 and "New password:" in output and "Again:" in output and "typed-on-a-tty" not in output
    store = SqliteStore(state)
    assert password_matches(store.get_user("alice").password_hash, "typed-on-a-tty-1")
    store.close()
