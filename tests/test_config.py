import re
import subprocess
import sys
import textwrap

import pytest

from fastproxy.config import ConfigError, StateConfig, load_config


@pytest.fixture
def files(tmp_path, tls_files):
    (tmp_path / "token").write_text("t0ken\n")
    (tmp_path / "key").write_text("k3y\n")
    return tmp_path, tls_files


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


GOOD = """
    [server]
    listen = "0.0.0.0:9443"
    tls_cert_file = "{cert}"
    tls_key_file = "{key}"
    workers = 2

    [[clusters]]
    name = "prod"
    server = "https://10.0.0.1:6443"
    ca_file = "{ca}"
    token_file = "token"

    [[access_keys]]
    name = "admin"
    key_file = "key"
    user = "admin"
    groups = ["admins"]

    [[access_keys]]
    name = "ci"
    key_sha256 = "{digest}"
    user = "ci"
"""


def good(tls, **extra):
    import hashlib
    return GOOD.format(cert=tls["cert"], key=tls["key"], ca=tls["ca"],
                       digest=hashlib.sha256(b"ci-key").hexdigest(), **extra)


def test_good_config(files):
    tmp, tls = files
    config = load_config(write(tmp, good(tls)))
    assert (config.server.host, config.server.port, config.server.workers, config.server.tls) == ("0.0.0.0", 9443, 2, True)
    cluster = config.clusters[0]
    assert (cluster.name, cluster.host, cluster.port, cluster.authority) == ("prod", "10.0.0.1", 6443, "10.0.0.1:6443")
    assert cluster.token_file == str(tmp / "token")  # relative to the config file
    assert [k.user for k in config.access_keys] == ["admin", "ci"]
    import hashlib
    assert config.access_keys[0].key_sha256 == hashlib.sha256(b"k3y").digest()


@pytest.mark.parametrize("change,message", [
    (("workers = 2", "workers = 0"), "server.workers: must be > 0, not 0"),
    (("workers = 2", "workers = \"2\""), "server.workers: must be an integer, not '2'"),
    (("workers = 2", "wrokers = 2"), "server.wrokers: unknown key"),
    (('listen = "0.0.0.0:9443"', 'listen = "nohost"'), "server.listen: must be IP:PORT"),
    (('server = "https://10.0.0.1:6443"', 'server = "ftp://x"'), "clusters[0].server: must be an https://HOST[:PORT] URL"),
    (('name = "prod"', 'name = "Prod_1"'), "clusters[0].name: must be a lower-case DNS name"),
    (('token_file = "token"', 'token_file = "missing"'), "clusters[0].token_file: file not found"),
    (('token_file = "token"', ''), "clusters[0].token_file: a cluster needs token_file or client_cert_file"),
    (('user = "ci"', 'user = "ci"\nextra = 1'), "access_keys[1].extra: unknown key"),
    (('key_file = "key"', 'key_sha256 = "abc"'), "access_keys[0].key_sha256: must be 64 hex digits"),
    (('user = "admin"', 'user = "a\\r\\nImpersonate-User: root"'), "access_keys[0].user: must not be empty or"),
    (('user = "admin"', 'user = " system:masters"'), "access_keys[0].user: must not be empty or contain CR, LF"),
    (('user = "admin"', 'user = ""'), "access_keys[0].user: must not be empty"),
    (('name = "ci"', 'name = "admin"'), "access_keys[1].name: duplicate access key name 'admin'"),
])
def test_bad_values_name_the_key(files, change, message):
    tmp, tls = files
    text = good(tls).replace(*change)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp, text))
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


VIRTUAL = """
    [[virtual_clusters]]
    cluster = "prod"
    namespace = "team-a"
    name = "vc1"

    [[virtual_clusters]]
    cluster = "prod"
    namespace = "team-a"
    name = "vc2"
    server = "https://vc2.team-a:8443"
    ca_file = "{ca}"
    token_file = "token"
"""


def test_sharing_watches_across_identities_is_per_cluster_and_off_by_default(files):
    tmp, tls = files
    config = load_config(write(tmp, good(tls)))
    assert config.server.share_watches and not config.clusters[0].share_watches_across_identities
    across = good(tls).replace('token_file = "token"', 'token_file = "token"\nshare_watches_across_identities = true')
    assert load_config(write(tmp, across)).clusters[0].share_watches_across_identities
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp, across.replace("workers = 2", "workers = 2\nshare_watches = false")))
    assert str(err.value) == "clusters[0].share_watches_across_identities: needs [server] share_watches = true"


def test_virtual_clusters(files):
    tmp, tls = files
    via_host, direct = load_config(write(tmp, good(tls) + VIRTUAL.format(ca=tls["ca"]))).virtual_clusters
    assert (via_host.key, via_host.server) == ("prod/team-a/vc1", None)  # through the host's service proxy
    assert direct.key == "prod/team-a/vc2"
    assert (direct.server.name, direct.server.authority, direct.server.token_file) == (
        "prod/team-a/vc2", "vc2.team-a:8443", str(tmp / "token"))


@pytest.mark.parametrize("change,message", [
    (('cluster = "prod"', 'cluster = "dev"'), "virtual_clusters[0].cluster: no cluster is named 'dev'"),
    (('namespace = "team-a"', 'namespace = "Team A"'), "virtual_clusters[0].namespace: must be a lower-case DNS name"),
    (('name = "vc1"', ''), "virtual_clusters[0].name: is required"),
    (('name = "vc1"', 'name = "vc1"\ntoken_file = "token"'), "virtual_clusters[0].token_file: only with server"),
    (('name = "vc2"', 'name = "vc1"'), "virtual_clusters[1].name: duplicate virtual cluster 'prod/team-a/vc1'"),
    (('server = "https://vc2.team-a:8443"', 'server = "vc2"'), "virtual_clusters[1].server: must be an https://"),
    (('token_file = "token"', ''), "virtual_clusters[1].token_file: a cluster needs token_file"),
    (('name = "vc2"', 'name = "vc2"\nport = 1'), "virtual_clusters[1].port: unknown key"),
    (('name = "vc2"', 'name = "vc2"\nshare_watches_across_identities = true'),
     "virtual_clusters[1].share_watches_across_identities: only for [[clusters]]"),
])
def test_bad_virtual_clusters_name_the_key(files, change, message):
    tmp, tls = files
    text = good(tls) + VIRTUAL.replace(*change).format(ca=tls["ca"])
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp, text))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_certificate_that_does_not_load(files):
    tmp, tls = files
    text = good(tls).replace(f'tls_cert_file = "{tls["cert"]}"', 'tls_cert_file = "token"')
    with pytest.raises(ConfigError, match=r"^server.tls_cert_file: cannot be loaded"):
        load_config(write(tmp, text))


def test_cli_check_config_exit_codes(files):
    tmp, tls = files
    ok = subprocess.run([sys.executable, "-m", "fastproxy", "check-config", write(tmp, good(tls))],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "ok (1 clusters, 2 access keys)" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "fastproxy", "serve", "--config", str(tmp / "nope.toml")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr == f"fastproxy: {tmp / 'nope.toml'}: file not found\n"
    broken = subprocess.run([sys.executable, "-m", "fastproxy", "check-config", write(tmp, "[server\n")],
                            capture_output=True, text=True)
    assert broken.returncode == 2 and broken.stderr.count("\n") == 1 and "Traceback" not in broken.stderr


def test_cli_bad_flag_is_one_line():
    result = subprocess.run([sys.executable, "-m", "fastproxy", "serve", "--config", "x", "--wrokers", "2"],
                            capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (2, "fastproxy: unrecognized arguments: --wrokers 2\n")
    result = subprocess.run([sys.executable, "-m", "fastproxy", "serve"], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (2, "fastproxy serve: the following arguments are required: --config\n")


def test_hash_key():
    result = subprocess.run([sys.executable, "-m", "fastproxy", "hash-key"], input="ci-key\n", capture_output=True, text=True)
    import hashlib
    assert result.stdout.strip() == hashlib.sha256(b"ci-key").hexdigest()


IDENTITY = """
    [state]
    path = "state/fastproxy.db"

    [tokens]
    issuer = "https://gw.example"
    {mode}
    revocation_file = "revoked.txt"
    {algorithms}
"""


def identity_config(tmp, tls, mode='signing_keys_dir = "keys"', algorithms=""):
    (tmp / "state").mkdir(exist_ok=True)
    return good(tls) + IDENTITY.format(mode=mode, algorithms=algorithms)


def test_state_and_central_tokens(files):
    tmp, tls = files
    config = load_config(write(tmp, identity_config(tmp, tls)))
    assert config.state.path == str(tmp / "state" / "fastproxy.db")  # relative to the config file
    tokens = config.tokens
    assert (tokens.issuer, tokens.signing_keys_dir, tokens.jwks_file, tokens.revocation_file, tokens.algorithms) == (
        "https://gw.example", str(tmp / "keys"), None, str(tmp / "revoked.txt"), ("RS256", "ES256"))


def test_state_backend_defaults_to_sqlite_and_can_be_named(files):
    tmp, tls = files
    assert load_config(write(tmp, identity_config(tmp, tls))).state.backend == "sqlite"
    state = 'path = "state/fastproxy.db"'
    text = identity_config(tmp, tls).replace(state, state + '\nbackend = "sqlite"')
    assert load_config(write(tmp, text)).state == StateConfig(path=str(tmp / "state" / "fastproxy.db"), backend="sqlite")


def test_state_backends_are_the_ones_the_store_opens():
    from fastproxy import store
    from fastproxy.config import STATE_BACKENDS
    assert tuple(store.BACKENDS) == STATE_BACKENDS


def test_edge_tokens_read_a_jwks_file(files):
    tmp, tls = files
    (tmp / "jwks.json").write_text('{"keys": [{"kty": "EC", "kid": "k1", "alg": "ES256", "crv": "P-256"}]}')
    config = load_config(write(tmp, identity_config(tmp, tls, 'jwks_file = "jwks.json"', 'algorithms = ["ES256"]')))
    assert (config.tokens.jwks_file, config.tokens.signing_keys_dir, config.tokens.algorithms) == (
        str(tmp / "jwks.json"), None, ("ES256",))


def test_without_state_and_tokens_only_static_keys_exist(files):
    tmp, tls = files
    config = load_config(write(tmp, good(tls)))
    assert config.state is None and config.tokens is None


def test_token_algorithms_match_the_verifier():
    from fastproxy.auth.tokens import SUPPORTED_ALGORITHMS
    from fastproxy.config import TOKEN_ALGORITHMS
    assert TOKEN_ALGORITHMS == SUPPORTED_ALGORITHMS


@pytest.mark.parametrize("change,message", [
    (('path = "state/fastproxy.db"', 'path = "nowhere/fastproxy.db"'), "state.path: folder not found: "),
    (('path = "state/fastproxy.db"', 'path = "state"'), "state.path: "),
    (('path = "state/fastproxy.db"', 'path = "state/x.db"\ncache = 1'), "state.cache: unknown key"),
    (('path = "state/fastproxy.db"', ''), "state.path: is required"),
    (('path = "state/fastproxy.db"', 'path = "state/x.db"\nbackend = "zookeeper"'),
     "state.backend: must be one of sqlite, etcd, not 'zookeeper'"),
    (('path = "state/fastproxy.db"', 'path = "state/x.db"\nbackend = 1'), "state.backend: must be a string, not 1"),
    (('issuer = "https://gw.example"', ''), "tokens.issuer: is required"),
    (('issuer = "https://gw.example"', 'issuer = ""'), "tokens.issuer: must not be empty"),
    (('signing_keys_dir = "keys"', ''), "tokens.signing_keys_dir: give exactly one of signing_keys_dir"),
    (('signing_keys_dir = "keys"', 'signing_keys_dir = "keys"\njwks_file = "key"'),
     "tokens.signing_keys_dir: give exactly one of signing_keys_dir"),
    (('signing_keys_dir = "keys"', 'signing_keys_dir = "token"'), "tokens.signing_keys_dir: "),
    (('signing_keys_dir = "keys"', 'jwks_file = "missing.json"'), "tokens.jwks_file: file not found"),
    (('signing_keys_dir = "keys"', 'jwks_file = "token"'), "tokens.jwks_file: cannot be read"),
    (('signing_keys_dir = "keys"', 'jwks_file = "empty.json"'), "tokens.jwks_file: holds no key with a kid for RS256, ES256"),
    (('revocation_file = "revoked.txt"', 'revocation_file = "gone/revoked.txt"'), "tokens.revocation_file: folder not found"),
    (('revocation_file = "revoked.txt"', 'algorithms = ["HS256"]'), "tokens.algorithms: must list some of RS256, ES256, not 'HS256'"),
    (('revocation_file = "revoked.txt"', 'algorithms = []'), "tokens.algorithms: must list some of RS256, ES256"),
    (('revocation_file = "revoked.txt"', 'algorithm = "RS256"'), "tokens.algorithm: unknown key"),
])
def test_bad_identity_values_name_the_key(files, change, message):
    tmp, tls = files
    (tmp / "empty.json").write_text('{"keys": []}')
    text = identity_config(tmp, tls).replace(*change)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp, text))
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["state", "tokens"])
def test_identity_sections_must_be_tables(key):
    from fastproxy.config import parse_config
    with pytest.raises(ConfigError, match=rf"^{key}: must be a table, not 1$"):
        parse_config({key: 1})


def test_login_defaults_and_keys(files):
    from fastproxy.config import LoginConfig
    tmp, tls = files
    assert load_config(write(tmp, good(tls))).login == LoginConfig()
    text = identity_config(tmp, tls) + """
    [login]
    key_ttl = 7200
    token_ttl = 60
    verify_threads = 1
    max_waiting = 0
    free_failures = 0
    max_backoff = 30.5
    """
    assert load_config(write(tmp, text)).login == LoginConfig(7200, 60, 1, 0, 0, 30.5)


@pytest.mark.parametrize("login,message", [
    ("key_ttl = 0", "login.key_ttl: must be > 0, not 0"),
    ("key_ttl = 86401", "login.key_ttl: must be at most tokens.max_ttl (86400), not 86401"),
    ("token_ttl = 100000", "login.token_ttl: must be at most tokens.max_ttl (86400), not 100000"),
    ("verify_threads = 0", "login.verify_threads: must be > 0, not 0"),
    ("max_waiting = -1", "login.max_waiting: must be >= 0, not -1"),
    ("free_failures = true", "login.free_failures: must be an integer, not True"),
    ("max_backoff = inf", "login.max_backoff: must be a finite number, not inf"),
    ("ttl = 5", "login.ttl: unknown key"),
])
def test_bad_login_values_name_the_key(files, login, message):
    tmp, tls = files
    text = identity_config(tmp, tls).replace('revocation_file = "revoked.txt"', 'revocation_file = "revoked.txt"\nmax_ttl = 86400')
    with pytest.raises(ConfigError, match=rf"^{re.escape(message)}$"):
        load_config(write(tmp, text + f"\n    [login]\n    {login}\n"))


def test_without_tokens_the_login_ttls_are_bounded_by_the_default_max_ttl(files):
    tmp, tls = files
    with pytest.raises(ConfigError, match=r"^login.key_ttl: must be at most tokens.max_ttl \(2592000\), not 2592001$"):
        load_config(write(tmp, good(tls) + "\n    [login]\n    key_ttl = 2592001\n"))
