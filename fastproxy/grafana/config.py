"""The `[grafana]` table: which Grafana serves each cluster, and the auth-proxy headers it reads."""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ClusterConfig, ConfigError, _Table, base_url, server_trust

# Grafana's [auth.proxy] header_name default, and the header its `headers = Groups:...` reads.
DEFAULT_USER_HEADER = "X-WEBAUTH-USER"
DEFAULT_GROUPS_HEADER = "X-WEBAUTH-GROUPS"
# The cookie a browser holds the gateway's access key in (as the Loft UI names it).
DEFAULT_ACCESS_KEY_COOKIE = "loft_access_key"
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True, slots=True)
class GrafanaConfig:
    # Each cluster's Grafana as a server the gateway pools connections to (named by the cluster;
    # it carries no credential: Grafana trusts the auth-proxy headers from the gateway's address).
    servers: tuple[ClusterConfig, ...]
    user_header: str = DEFAULT_USER_HEADER
    groups_header: str = DEFAULT_GROUPS_HEADER  # "": no groups are sent
    access_key_cookie: str = DEFAULT_ACCESS_KEY_COOKIE


def _token(table: _Table, key: str, default: str, allow_empty: bool = False) -> str:
    value = table.str(key, default) or ""
    if (value or not allow_empty) and not set(value or "\n") <= _TOKEN_CHARS:
        raise ConfigError(f"{table.key(key)}: must be a header or cookie name (letters, digits, '-', '_'), not {value!r}")
    return value


def _server(data: object, where: str, clusters: frozenset[str]) -> ClusterConfig:
    t = _Table(data, where)
    cluster = t.str("cluster", required=True)
    if cluster not in clusters:
        raise ConfigError(f"{t.key('cluster')}: no [[clusters]] entry is named {cluster!r}")
    scheme, host, port = base_url(t, "url")
    ca_file, insecure = server_trust(t)
    server = ClusterConfig(
        name=cluster, scheme=scheme, host=host, port=port,
        ca_file=ca_file, insecure_skip_tls_verify=insecure,
        connect_timeout=t.positive("connect_timeout", float, 5.0),
        response_header_timeout=t.positive("response_header_timeout", float, 60.0))
    t.finish()
    return server


def parse_grafana_config(data: object, clusters: frozenset[str]) -> GrafanaConfig:
    """The [grafana] table; ConfigError naming the key otherwise. `clusters`: the configured names."""
    t = _Table(data, "grafana")
    entries = t._get("clusters", list, [])
    servers = tuple(_server(item, f"grafana.clusters[{i}]", clusters) for i, item in enumerate(entries))
    names = [server.name for server in servers]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"grafana.clusters[{i}].cluster: cluster {name!r} already has a Grafana")
    user_header = _token(t, "user_header", DEFAULT_USER_HEADER)
    groups_header = _token(t, "groups_header", DEFAULT_GROUPS_HEADER, allow_empty=True)
    if groups_header.lower() == user_header.lower():
        raise ConfigError(f"{t.key('groups_header')}: must differ from user_header")
    config = GrafanaConfig(servers, user_header, groups_header, _token(t, "access_key_cookie", DEFAULT_ACCESS_KEY_COOKIE))
    t.finish()
    return config

