"""The TOML configuration: parsed and checked once into frozen objects, with one-line errors."""
from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import ssl
import tomllib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from .auth.identity import HeaderValueError, check_header_value, key_digest
from .names import DNS_SUBDOMAIN

if TYPE_CHECKING:
    from .grafana.config import GrafanaConfig
    from .limits import LimitsConfig
    from .observe.accesslog import AccessLogConfig
    from .observe.audit import AuditConfig
    from .oidc.config import OidcConfig


class ConfigError(Exception):
    """A configuration problem, worded as one line that names the key."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8443
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    workers: int = 1
    header_timeout: float = 10.0
    idle_timeout: float = 120.0
    max_header_bytes: int = 65536
    max_body_bytes: int = 0
    shutdown_grace: float = 30.0
    watch_termination_period: float = 10.0
    log_level: str = "info"
    pid_file: str | None = None  # where `fastproxy reload` finds the running gateway
    share_watches: bool = True  # same watches of one identity share one upstream stream

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str
    scheme: str
    host: str
    port: int
    ca_file: str | None = None
    insecure_skip_tls_verify: bool = False
    tls_server_name: str | None = None
    token_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    connect_timeout: float = 5.0
    response_header_timeout: float = 120.0
    max_connections: int = 20000
    max_idle_connections: int = 128
    idle_connection_timeout: float = 90.0
    # Watches of different identities share streams opened as the gateway, each joiner admitted
    # by a SubjectAccessReview (watchshare.stream_identity); needs [server] share_watches.
    share_watches_across_identities: bool = False

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class VirtualClusterConfig:
    """`[[virtual_clusters]]`: a virtual cluster in namespace `namespace` of host cluster `cluster`."""

    cluster: str
    namespace: str
    name: str
    server: ClusterConfig | None = None  # its own API server URL; None: the host's service proxy

    @property
    def key(self) -> str:
        return f"{self.cluster}/{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class AccessKeyConfig:
    name: str
    key_sha256: bytes = field(repr=False)
    user: str
    groups: tuple[str, ...] = ()


# The [state] backends fastproxy.store can open (fastproxy.store.BACKENDS; not imported here).
STATE_BACKENDS = ("sqlite", "etcd")


@dataclass(frozen=True, slots=True)
class StateConfig:
    path: str  # the SQLite state file shared by every worker and the operator commands ("" for etcd)
    backend: str = "sqlite"  # one of STATE_BACKENDS
    etcd: EtcdConfig | None = None  # backend = "etcd"


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """`[state] backend = "etcd"`: one etcd (cluster) shared by a fleet of gateways (fastproxy.store.etcd)."""

    endpoints: tuple[str, ...]       # http(s)://host:port of the members' client URLs, tried in turn
    prefix: str = "/fastproxy/"      # every key of this fleet starts with it: several fleets share one etcd
    ca_file: str | None = None
    cert_file: str | None = None     # client certificate, with key_file, when etcd asks for one
    key_file: str | None = None
    timeout: float = 5.0             # seconds for one request to a member before the next is tried
    # Seconds without contact after which state-store credentials are refused, since a revocation
    # may have been missed; 0 keeps serving the last snapshot however old (fail open).
    max_staleness: float = 60.0


# As fastproxy.auth.tokens.SUPPORTED_ALGORITHMS (not imported: it loads the crypto libraries).
TOKEN_ALGORITHMS = ("RS256", "ES256")
MAX_TOKEN_TTL = 30 * 86400  # the default of [tokens] max_ttl: thirty days


@dataclass(frozen=True, slots=True)
class TokensConfig:
    """Direct Cluster Endpoint tokens: signed here (signing_keys_dir) or only verified (jwks_file)."""

    issuer: str
    signing_keys_dir: str | None = None
    jwks_file: str | None = None
    revocation_file: str | None = None
    algorithms: tuple[str, ...] = TOKEN_ALGORITHMS  # the first is used for newly generated keys
    max_ttl: int = MAX_TOKEN_TTL  # seconds; the longest lifetime of a token this gateway issues


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Prometheus metrics at GET /metrics (fastproxy.observe.metrics).

    `enabled = false` registers no observer at all and /metrics answers 404. Unless `open`, a
    scrape needs a bearer credential (an access key, or a token for any cluster) whose identity
    is an administrator, with `loft:admins` or `system:masters` among its groups; a key with a
    scope must also allow the non-resource URL: a rule with `nonResourceURLs: ["/metrics"]` and
    the verb `get` (or none, or `*`) for the request target `Management` (or none). No
    credential: 401; any other: 403, as a Kubernetes Status.
    """

    enabled: bool = True
    open: bool = False  # anyone who reaches the port may scrape, without a credential


@dataclass(frozen=True, slots=True)
class ActivityConfig:
    """`[activity]`: which requests count as sleep-mode activity (fastproxy.observe.activity), with
    `[state]`; requests the gateway refused never do."""

    enabled: bool = True
    ignore_verbs: frozenset[str] = frozenset()  # e.g. "watch": an open watch is not someone at work
    ignore_users: frozenset[str] = frozenset()  # e.g. a monitoring robot's subject


MAX_UI_SESSION = 12 * 3600  # seconds: the longest [ui] session_seconds


@dataclass(frozen=True, slots=True)
class UIConfig:
    """`[ui]`: the status page at /ui/ (fastproxy.ui), for administrators (`loft:admins`), who
    sign in with an access key; a session lasts `session_seconds`. Off: /ui/ answers 404 and
    nothing of it runs."""

    enabled: bool = True
    session_seconds: int = 1800


@dataclass(frozen=True, slots=True)
class LoginConfig:
    """`[login]`: the /auth/ endpoints (fastproxy.login): password login, token exchange, logout."""

    key_ttl: int = 86400             # seconds a Login access key lives
    token_ttl: int = 600             # seconds a token from /auth/token lives
    verify_threads: int = 2          # password checks running at once per worker (argon2id: tens of ms, 64 MiB each)
    max_waiting: int = 32            # checks that may wait for a thread; beyond it a login gets 429
    free_failures: int = 3           # failed logins per user name and per client address before back-off
    max_backoff: float = 300.0       # seconds: the longest wait the back-off (1 s, doubling) imposes


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    clusters: tuple[ClusterConfig, ...]
    access_keys: tuple[AccessKeyConfig, ...]
    path: str = ""
    state: StateConfig | None = None    # None: only the static access keys exist
    tokens: TokensConfig | None = None  # None: tokens are neither issued nor accepted
    metrics: MetricsConfig = MetricsConfig()
    activity: ActivityConfig = ActivityConfig()
    audit: AuditConfig | None = None    # None: no audit log
    access_log: AccessLogConfig | None = None  # None: no access log (it is on unless [access_log] enabled = false)
    virtual_clusters: tuple[VirtualClusterConfig, ...] = ()
    grafana: GrafanaConfig | None = None  # None: /grafana/ is not served
    login: LoginConfig = LoginConfig()
    ui: UIConfig = UIConfig()
    oidc: OidcConfig | None = None  # None: /oidc/ is not served
    limits: LimitsConfig | None = None  # None: no limits per identity, cluster or worker


class _Table:
    """Reads one TOML table, remembering which keys were used so unknown ones are errors."""

    def __init__(self, data: object, where: str):
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: must be a table")
        self.data, self.where, self.used = data, where, set()

    def _get(self, key, kind, default, required=False):
        self.used.add(key)
        if key not in self.data:
            if required:
                raise ConfigError(f"{self.key(key)}: is required")
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{self.key(key)}: must be {_KIND_NAMES[kind]}, not {value!r}")
        return value

    def key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def str(self, key, default=None, required=False) -> str | None:
        return self._get(key, str, default, required)

    def bool(self, key, default=False) -> bool:
        return self._get(key, bool, default)

    def positive(self, key: str, kind: type, default: float, *, allow_zero: bool = False) -> Any:
        value = self._get(key, kind, default)
        if not math.isfinite(value):  # TOML has nan and inf: no timeout, size or count is either
            raise ConfigError(f"{self.key(key)}: must be a finite number, not {value!r}")
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{self.key(key)}: must be {'>= 0' if allow_zero else '> 0'}, not {value!r}")
        return value

    def file(self, key, required=False) -> str | None:
        path = self.str(key, required=required)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{self.key(key)}: file not found: {path}")
        return path

    def strings(self, key) -> tuple[str, ...]:
        values = self._get(key, list, [])
        if not all(isinstance(v, str) and v for v in values):
            raise ConfigError(f"{self.key(key)}: must be a list of non-empty strings")
        return tuple(values)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")


_KIND_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number", list: "a list",
               dict: "a table"}
_LOG_LEVELS = ("debug", "info", "warning", "error")


def _header_safe(where: str, value: str) -> str:
    """`value` if it can be sent as an impersonation header value (auth.identity.check_header_value)."""
    try:
        return check_header_value(value, "value")
    except HeaderValueError:
        raise ConfigError(f"{where}: must not be empty or contain CR, LF, NUL, other control characters "
                          "or leading or trailing spaces") from None


def _check_tls(table: _Table, key: str, load) -> None:
    try:
        load()
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"{table.key(key)}: cannot be loaded: {exc}") from None


def _listen(table: _Table) -> tuple[str, int]:
    value = table.str("listen", "127.0.0.1:8443")
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not 0 <= number <= 65535:
        raise ConfigError(f"{table.key('listen')}: must be IP:PORT (e.g. \"0.0.0.0:8443\"), not {value!r}")
    return host, number


def _server(data: object) -> ServerConfig:
    t = _Table(data, "server")
    host, port = _listen(t)
    cert, key = t.file("tls_cert_file"), t.file("tls_key_file")
    if (cert is None) != (key is None):
        raise ConfigError(f"{t.key('tls_key_file' if key is None else 'tls_cert_file')}: "
                          "tls_cert_file and tls_key_file go together")
    log_level = t.str("log_level", "info")
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"{t.key('log_level')}: must be one of {', '.join(_LOG_LEVELS)}")
    if cert is not None:
        _check_tls(t, "tls_cert_file", lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key))
    server = ServerConfig(
        host=host, port=port, tls_cert_file=cert, tls_key_file=key,
        workers=t.positive("workers", int, 1),
        header_timeout=t.positive("header_timeout", float, 10.0),
        idle_timeout=t.positive("idle_timeout", float, 120.0),
        max_header_bytes=t.positive("max_header_bytes", int, 65536),
        max_body_bytes=t.positive("max_body_bytes", int, 0, allow_zero=True),
        shutdown_grace=t.positive("shutdown_grace", float, 30.0, allow_zero=True),
        watch_termination_period=t.positive("watch_termination_period", float, 10.0, allow_zero=True),
        log_level=log_level,
        pid_file=_writable_path(t, "pid_file"),
        share_watches=t.bool("share_watches", True),
    )
    t.finish()
    return server


def base_url(table: _Table, key: str) -> tuple[str, str, int]:
    """The required `key` as an http(s)://HOST[:PORT] URL: (scheme, host, port)."""
    text = table.str(key, required=True)
    url = urlsplit(text)
    try:
        port = url.port
    except ValueError:
        port = -1
    if url.scheme not in ("https", "http") or not url.hostname or port == -1 or url.path not in ("", "/") \
            or url.query or url.fragment or url.username:
        raise ConfigError(f"{table.key(key)}: must be an https://HOST[:PORT] URL, not {text!r}")
    return url.scheme, url.hostname, port or (443 if url.scheme == "https" else 80)


def server_trust(table: _Table) -> tuple[str | None, bool]:
    """How a server's certificate is checked: (ca_file, insecure_skip_tls_verify), the CA loaded."""
    insecure = table.bool("insecure_skip_tls_verify")
    ca_file = table.file("ca_file")
    if ca_file and insecure:
        raise ConfigError(f"{table.key('insecure_skip_tls_verify')}: cannot be combined with ca_file")
    if ca_file is not None:
        _check_tls(table, "ca_file", lambda: ssl.create_default_context(cafile=ca_file))
    return ca_file, insecure


def _cluster(data: object, where: str) -> ClusterConfig:
    t = _Table(data, where)
    name = t.str("name", required=True)
    if not DNS_SUBDOMAIN.match(name):
        raise ConfigError(f"{t.key('name')}: must be a lower-case DNS name, not {name!r}")
    scheme, host, port = base_url(t, "server")
    ca_file, insecure = server_trust(t)
    token_file = t.file("token_file")
    cert, key = t.file("client_cert_file"), t.file("client_key_file")
    if (cert is None) != (key is None):
        raise ConfigError(f"{t.key('client_key_file' if key is None else 'client_cert_file')}: "
                          "client_cert_file and client_key_file go together")
    if token_file is None and cert is None:
        raise ConfigError(f"{t.key('token_file')}: a cluster needs token_file or client_cert_file + client_key_file")
    if cert is not None:
        _check_tls(t, "client_cert_file", lambda: ssl.create_default_context().load_cert_chain(cert, key))
    cluster = ClusterConfig(
        name=name, scheme=scheme, host=host, port=port,
        ca_file=ca_file, insecure_skip_tls_verify=insecure, tls_server_name=t.str("tls_server_name"),
        token_file=token_file, client_cert_file=cert, client_key_file=key,
        connect_timeout=t.positive("connect_timeout", float, 5.0),
        response_header_timeout=t.positive("response_header_timeout", float, 120.0),
        max_connections=t.positive("max_connections", int, 20000),
        max_idle_connections=t.positive("max_idle_connections", int, 128, allow_zero=True),
        idle_connection_timeout=t.positive("idle_connection_timeout", float, 90.0),
        share_watches_across_identities=t.bool("share_watches_across_identities"),
    )
    t.finish()
    return cluster


def _virtual_cluster(data: object, where: str, clusters: tuple[ClusterConfig, ...]) -> VirtualClusterConfig:
    t = _Table(data, where)
    names = []
    for key in ("cluster", "namespace", "name"):
        value = t.str(key, required=True)
        if not DNS_SUBDOMAIN.match(value):
            raise ConfigError(f"{t.key(key)}: must be a lower-case DNS name, not {value!r}")
        names.append(value)
    cluster, namespace, name = names
    if cluster not in [c.name for c in clusters]:
        raise ConfigError(f"{t.key('cluster')}: no cluster is named {cluster!r}")
    endpoint_keys = set(t.data) - t.used
    if "share_watches_across_identities" in endpoint_keys:  # a virtual cluster's watches are never shared
        raise ConfigError(f"{t.key('share_watches_across_identities')}: only for [[clusters]]")
    server = None
    if "server" in endpoint_keys:
        # The same keys as a [[clusters]] entry; named after the virtual cluster in logs and messages.
        endpoint = _cluster({key: t.data[key] for key in endpoint_keys | {"name"}}, where)
        server = dataclasses.replace(endpoint, name=f"{cluster}/{namespace}/{name}")
    elif endpoint_keys:
        raise ConfigError(f"{t.key(sorted(endpoint_keys)[0])}: only with server (without it the virtual "
                          "cluster is reached through its host cluster's service proxy)")
    return VirtualClusterConfig(cluster, namespace, name, server)


def _access_key(data: object, where: str) -> AccessKeyConfig:
    t = _Table(data, where)
    name = t.str("name", required=True)
    digest_hex, key_file = t.str("key_sha256"), t.file("key_file")
    if (digest_hex is None) == (key_file is None):
        raise ConfigError(f"{t.key('key_sha256')}: give exactly one of key_sha256 or key_file")
    if key_file is not None:
        with open(key_file, encoding="utf-8") as f:
            key = f.read().strip()
        if not key:
            raise ConfigError(f"{t.key('key_file')}: file is empty: {key_file}")
        digest = key_digest(key)
    else:
        try:
            digest = bytes.fromhex(digest_hex)
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ConfigError(f"{t.key('key_sha256')}: must be 64 hex digits (the SHA-256 of the key)")
    user = _header_safe(t.key("user"), t.str("user", required=True))
    groups = tuple(_header_safe(t.key("groups"), g) for g in t.strings("groups"))
    t.finish()
    return AccessKeyConfig(name=name, key_sha256=digest, user=user, groups=groups)


def _writable_path(table: _Table, key: str, *, directory: bool = False, required: bool = False) -> str | None:
    """A file or directory the gateway may create: its parent folder must exist."""
    path = table.str(key, required=required)
    if path is None:
        return None
    if os.path.exists(path) and os.path.isdir(path) != directory:
        raise ConfigError(f"{table.key(key)}: {path} is {'not ' if directory else ''}a directory")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ConfigError(f"{table.key(key)}: folder not found: {os.path.dirname(path)}")
    return path


def _state(data: object) -> StateConfig:
    t = _Table(data, "state")
    backend = t.str("backend", "sqlite")
    if backend not in STATE_BACKENDS:
        raise ConfigError(f"{t.key('backend')}: must be one of {', '.join(STATE_BACKENDS)}, not {backend!r}")
    if backend == "etcd":
        state = StateConfig(path="", backend=backend, etcd=_etcd(t))
    else:
        state = StateConfig(path=_writable_path(t, "path", required=True), backend=backend)
    t.finish()
    return state


def _etcd(t: _Table) -> EtcdConfig:
    endpoints = t.strings("endpoints")
    if not endpoints:
        raise ConfigError(f"{t.key('endpoints')}: is required with backend = \"etcd\"")
    for endpoint in endpoints:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query:
            raise ConfigError(f"{t.key('endpoints')}: {endpoint!r} is not http(s)://host:port")
    prefix = t.str("prefix", "/fastproxy/")
    if not prefix or not prefix.endswith("/"):
        raise ConfigError(f"{t.key('prefix')}: must end with '/', not {prefix!r}")
    files = {key: t.file(key) for key in ("ca_file", "cert_file", "key_file")}
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise ConfigError(f"{t.key('cert_file')}: cert_file and key_file go together")
    return EtcdConfig(endpoints, prefix, **files, timeout=t.positive("timeout", float, 5.0),
                      max_staleness=t.positive("max_staleness", float, 60.0, allow_zero=True))


def _tokens(data: object) -> TokensConfig:
    t = _Table(data, "tokens")
    issuer = t.str("issuer", required=True)
    if not issuer:
        raise ConfigError(f"{t.key('issuer')}: must not be empty")
    algorithms = t.strings("algorithms") if "algorithms" in t.data else TOKEN_ALGORITHMS
    unknown = [a for a in algorithms if a not in TOKEN_ALGORITHMS]
    if unknown or not algorithms:
        raise ConfigError(f"{t.key('algorithms')}: must list some of {', '.join(TOKEN_ALGORITHMS)}"
                          + (f", not {unknown[0]!r}" if unknown else ""))
    keys_dir = _writable_path(t, "signing_keys_dir", directory=True)
    jwks_file = t.file("jwks_file")
    if (keys_dir is None) == (jwks_file is None):
        raise ConfigError(f"{t.key('signing_keys_dir')}: give exactly one of signing_keys_dir (this gateway "
                          "signs tokens) or jwks_file (it only verifies them)")
    if jwks_file is not None:
        _check_jwks(t, jwks_file, algorithms)
    tokens = TokensConfig(issuer=issuer, signing_keys_dir=keys_dir, jwks_file=jwks_file,
                          revocation_file=_writable_path(t, "revocation_file"), algorithms=tuple(algorithms),
                          max_ttl=t.positive("max_ttl", int, MAX_TOKEN_TTL))
    t.finish()
    return tokens


def _metrics(data: object) -> MetricsConfig:
    t = _Table(data, "metrics")
    metrics = MetricsConfig(enabled=t.bool("enabled", True), open=t.bool("open"))
    t.finish()
    return metrics


def _activity(data: object) -> ActivityConfig:
    t = _Table(data, "activity")
    activity = ActivityConfig(t.bool("enabled", True), frozenset(t.strings("ignore_verbs")),
                              frozenset(t.strings("ignore_users")))
    t.finish()
    return activity


def _login(data: object, tokens: TokensConfig | None) -> LoginConfig:
    t = _Table(data, "login")
    longest = tokens.max_ttl if tokens is not None else MAX_TOKEN_TTL
    login = LoginConfig(key_ttl=t.positive("key_ttl", int, 86400), token_ttl=t.positive("token_ttl", int, 600),
                        verify_threads=t.positive("verify_threads", int, 2),
                        max_waiting=t.positive("max_waiting", int, 32, allow_zero=True),
                        free_failures=t.positive("free_failures", int, 3, allow_zero=True),
                        max_backoff=t.positive("max_backoff", float, 300.0))
    for key in ("key_ttl", "token_ttl"):
        if getattr(login, key) > longest:
            raise ConfigError(f"{t.key(key)}: must be at most tokens.max_ttl ({longest}), not {getattr(login, key)}")
    t.finish()
    return login


def _ui(data: object) -> UIConfig:
    t = _Table(data, "ui")
    ui = UIConfig(t.bool("enabled", True), t.positive("session_seconds", int, 1800))
    if ui.session_seconds > MAX_UI_SESSION:
        raise ConfigError(f"ui.session_seconds: must be at most {MAX_UI_SESSION} (a session is short-lived), not {ui.session_seconds}")
    t.finish()
    return ui


def _audit(data: object) -> AuditConfig:
    from .observe.audit import parse_audit_config  # the audit module parses its own table

    return parse_audit_config(data)


def _access_log(data: object) -> AccessLogConfig | None:
    from .observe.accesslog import parse_access_log_config  # the access log parses its own table

    return parse_access_log_config(data)


def _grafana(data: object, clusters: tuple[ClusterConfig, ...]) -> GrafanaConfig:
    from .grafana.config import parse_grafana_config  # the grafana package parses its own table

    return parse_grafana_config(data, frozenset(cluster.name for cluster in clusters))


def _oidc(data: object, tokens: TokensConfig | None, state: StateConfig | None) -> OidcConfig:
    from .oidc.config import parse_oidc_config  # the oidc package parses its own table
    if state is None:
        raise ConfigError("oidc: the OpenID Connect provider logs in the state store's users: it needs [state]")
    return parse_oidc_config(data, tokens.issuer if tokens is not None and tokens.signing_keys_dir else None)


def _limits(data: object) -> LimitsConfig | None:
    from .limits import parse_limits_config  # the limits module parses its own table

    return parse_limits_config(data)


def _check_jwks(table: _Table, path: str, algorithms: tuple[str, ...]) -> None:
    try:
        with open(path, "rb") as f:
            jwks = orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(f"{table.key('jwks_file')}: cannot be read: {exc}") from None
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list) or not any(
            isinstance(k, dict) and k.get("alg") in algorithms and isinstance(k.get("kid"), str) for k in keys):
        raise ConfigError(f"{table.key('jwks_file')}: holds no key with a kid for {', '.join(algorithms)}")


def _list_of_tables(root: _Table, key: str) -> list:
    value = root._get(key, list, [])
    return [(item, f"{key}[{i}]") for i, item in enumerate(value)]


def parse_config(data: dict, path: str = "") -> Config:
    root = _Table(data, "")
    server = _server(root._get("server", dict, {}))
    clusters = tuple(_cluster(item, where) for item, where in _list_of_tables(root, "clusters"))
    access_keys = tuple(_access_key(item, where) for item, where in _list_of_tables(root, "access_keys"))
    state = _state(root._get("state", dict, None)) if "state" in root.data else None
    tokens = _tokens(root._get("tokens", dict, None)) if "tokens" in root.data else None
    metrics = _metrics(root._get("metrics", dict, {}))
    activity = _activity(root._get("activity", dict, {}))
    audit = _audit(root._get("audit", dict, None)) if "audit" in root.data else None
    access_log = _access_log(root._get("access_log", dict, {}))
    virtual_clusters = tuple(_virtual_cluster(item, where, clusters)
                             for item, where in _list_of_tables(root, "virtual_clusters"))
    grafana = _grafana(root._get("grafana", dict, None), clusters) if "grafana" in root.data else None
    login = _login(root._get("login", dict, {}), tokens)
    ui = _ui(root._get("ui", dict, {}))
    oidc = _oidc(root._get("oidc", dict, None), tokens, state) if "oidc" in root.data else None
    limits = _limits(root._get("limits", dict, {}))
    root.finish()
    names = [c.name for c in clusters]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"clusters[{i}].name: duplicate cluster name {name!r}")
        if clusters[i].share_watches_across_identities and not server.share_watches:
            raise ConfigError(f"clusters[{i}].share_watches_across_identities: needs [server] share_watches = true")
    keys = [v.key for v in virtual_clusters]
    for i, key in enumerate(keys):
        if key in keys[:i]:
            raise ConfigError(f"virtual_clusters[{i}].name: duplicate virtual cluster {key!r}")
    key_names = [k.name for k in access_keys]
    digests = [k.key_sha256 for k in access_keys]
    for i, key in enumerate(access_keys):
        if key.name in key_names[:i]:
            raise ConfigError(f"access_keys[{i}].name: duplicate access key name {key.name!r}")
        if key.key_sha256 in digests[:i]:
            raise ConfigError(f"access_keys[{i}]: the same key is configured twice")
    return Config(server=server, clusters=clusters, access_keys=access_keys, path=path, state=state, tokens=tokens,
                  metrics=metrics, activity=activity, audit=audit, access_log=access_log,
                  virtual_clusters=virtual_clusters, grafana=grafana, login=login, ui=ui, oidc=oidc,
                  limits=limits)


def load_config(path: str) -> Config:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    # Relative file paths in the config are relative to the config file, not the working directory.
    base = os.path.dirname(os.path.abspath(path))
    _resolve_paths(data, base)
    return parse_config(data, path)


_PATH_KEYS = ("policy_file", "tls_cert_file", "tls_key_file", "ca_file", "token_file", "client_cert_file",
              "client_key_file", "key_file", "cert_file", "path", "pid_file", "signing_keys_dir", "jwks_file", "revocation_file")


def _resolve_paths(node: object, base: str) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _PATH_KEYS and isinstance(value, str) and value and not os.path.isabs(value):
                node[key] = os.path.join(base, value)
            else:
                _resolve_paths(value, base)
    elif isinstance(node, list):
        for item in node:
            _resolve_paths(item, base)
