"""`fastproxy demo`: a simulated cluster, the gateway in front of it, keys and a kubeconfig."""
from __future__ import annotations

import logging
import os
import secrets
import socket
import textwrap
from pathlib import Path

from .config import Config, ConfigError, load_config

log = logging.getLogger("fastproxy.demo")

CLUSTER = "demo"
# The restricted key's user may read pods, logs and configmaps in team-a, nothing else.
VIEWER_RULES = [{"groups": ["demo:viewers"], "verbs": ["get", "list", "watch"],
                 "resources": ["pods", "pods/log", "configmaps"], "namespaces": ["team-a"], "apiGroups": [""]}]


def _write_secret(path: Path, text: str) -> None:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"--listen {host}:{port}: cannot listen there: {exc.strerror}") from None


def prepare(state: Path, cluster_url: str, cluster_ca: Path, gateway_token: Path, listen: str) -> Path:
    """Write the gateway's TLS files, access keys, config and kubeconfig; return the config path."""
    from devcluster.certs import ensure_credentials  # the demo's throwaway CA comes from there too
    tls = ensure_credentials(state / "gateway-tls")
    _write_secret(state / "admin.key", "fpk-" + secrets.token_urlsafe(32))
    _write_secret(state / "viewer.key", "fpk-" + secrets.token_urlsafe(32))
    config = state / "fastproxy.toml"
    config.write_text(textwrap.dedent(f"""\
        # Written by `fastproxy demo`; see README.md for every key.
        [server]
        listen = "{listen}"
        tls_cert_file = "{tls.server_cert_file}"
        tls_key_file = "{tls.server_key_file}"

        [[clusters]]
        name = "{CLUSTER}"
        server = "{cluster_url}"
        ca_file = "{cluster_ca}"
        token_file = "{gateway_token}"

        [state]
        path = "state.db"

        [tokens]
        issuer = "https://{listen}"
        signing_keys_dir = "signing-keys"
        max_ttl = 86400

        [access_log]
        path = "access.log"
        sample = 1.0

        [audit]
        path = "audit.log"

        [[access_keys]]
        name = "admin"
        key_file = "admin.key"
        user = "admin"
        groups = ["system:masters", "loft:admins"]

        [[access_keys]]
        name = "viewer"
        key_file = "viewer.key"
        user = "viewer"
        groups = ["demo:viewers"]
    """))
    server = f"https://{listen}/kubernetes/cluster/{CLUSTER}"
    management = f"https://{listen}/kubernetes/management"
    users = "".join(f"""
        - name: {name}
          user:
            token: {(state / f"{name}.key").read_text().strip()}""" for name in ("admin", "viewer"))
    contexts = "".join(f"""
        - name: {name}
          context:
            cluster: {CLUSTER}
            user: {name}
            namespace: team-a""" for name in ("admin", "viewer")) + """
        - name: management
          context:
            cluster: management
            user: admin"""
    kubeconfig = state / "kubeconfig"
    kubeconfig.write_text(textwrap.dedent(f"""\
        apiVersion: v1
        kind: Config
        clusters:
        - name: {CLUSTER}
          cluster:
            server: {server}
            certificate-authority: {tls.ca_file}
        - name: management
          cluster:
            server: {management}
            certificate-authority: {tls.ca_file}
        users:{users}
        contexts:{contexts}
        current-context: admin
    """))
    kubeconfig.chmod(0o600)
    return config


def instructions(state: Path, listen: str) -> str:
    kubeconfig = state / "kubeconfig"
    config = state / "fastproxy.toml"
    ca, admin_key = state / "gateway-tls" / "ca.crt", state / "admin.key"
    return textwrap.dedent(f"""
        fastproxy demo is running. In another terminal:

          export KUBECONFIG={kubeconfig}
          kubectl get pods -A                          # admin access key, through the gateway
          kubectl auth whoami                          # the cluster sees the key's user
          kubectl get configmaps -w                    # a watch; the cluster changes objects every second
          kubectl logs -f web-5d4f8c7b9-h7k2m          # a followed log stream
          kubectl exec web-5d4f8c7b9-h7k2m -- echo hi  # exec through the gateway
          kubectl --context viewer get pods            # the restricted key: allowed in team-a...
          kubectl --context viewer get secrets         # ...and Forbidden here
          kubectl --context viewer --as system:admin get pods  # Forbidden: this key may not impersonate
          kubectl --as jane auth whoami                # the admin key may: the cluster sees jane

        The management API (management.loft.sh/v1), served by the gateway itself:

          kubectl --context management api-resources   # users, teams, selves, ownedaccesskeys, ...
          kubectl --context management get users,teams,clusters
          kubectl --context management get users -w &  # then, from the CLI:
          fastproxy user create --config {config} bob --email bob@example.com
          kubectl --context management explain user.spec
          kubectl --context management get namespaceactivities   # who last worked where (sleep mode)

        Prometheus metrics, for the admin key:

          curl -s --cacert {ca} -H "Authorization: Bearer $(cat {admin_key})" https://{listen}/metrics | grep ^fastproxy_requests

        The status page, for admins: sign in with the contents of {admin_key}, or make a
        password user of loft:admins and sign in with the name and password:

          https://{listen}/ui/
          fastproxy user create --config {config} ops --group loft:admins
          fastproxy user set-password --config {config} ops

        What the gateway writes and answers about itself:

          tail -f {state / "access.log"}    # a JSON line per request; "id" is the X-Request-Id header...
          tail -f {state / "audit.log"}     # ...and the auditID of the request's audit events
          curl -s --cacert {ca} "https://{listen}/readyz?verbose"

        Password login (/auth/): give jane a password, log in, use the Login key it answers:

          fastproxy user set-password --config {config} jane
          curl -s --cacert {ca} -d '{{"username":"jane","password":"..."}}' https://{listen}/auth/password/login

        Ctrl-C stops everything.
    """)


def seed_state(config: Config) -> None:
    """A user and a team in a new demo's state store, so the management API has something to show."""
    from .auth.credentials import open_state_admin

    admin = open_state_admin(config)
    try:
        if not admin.list_users():
            admin.create_user("jane", display_name="Jane Doe", email="jane@example.com", groups=["demo:viewers"])
            admin.create_team("developers", members=["jane"], display_name="Developers")
    finally:
        admin.close()


def _require_devcluster() -> None:
    """The simulated cluster ships as its own distribution; a base install lacks it."""
    try:
        import devcluster  # noqa: F401
    except ImportError:
        raise ConfigError("demo: the simulated cluster is not installed: run scripts/run, "
                          "or pip install -e ./simulated-cluster from the source tree") from None


def run_demo(state_dir: str, listen: str, activity_rate: float) -> int:
    _require_devcluster()
    from devcluster.process import start_devcluster

    from .server import configure_logging, serve
    configure_logging("info")
    host, _, port = listen.rpartition(":")
    try:
        _check_port_free(host, int(port))
    except ValueError:
        raise ConfigError(f"--listen: must be HOST:PORT, not {listen!r}") from None
    state = Path(state_dir).resolve()
    state.mkdir(parents=True, exist_ok=True)
    cluster = start_devcluster(state / "cluster", rules=VIEWER_RULES, activity_rate=activity_rate)
    try:
        config = load_config(str(prepare(state, cluster.url, cluster.ca_file, cluster.gateway_token_file, listen)))
        seed_state(config)
        log.info("simulated cluster %r at %s (pid %d)", CLUSTER, cluster.url, cluster.pid)
        print(instructions(state, listen), flush=True)
        return serve(config)
    finally:
        cluster.stop()
