"""`fastproxy kubeconfig`: write or merge one gateway context into a kubeconfig, as `loft use` does.

Names follow `loft use`: `loft_CLUSTER`, `loft-vcluster_VCLUSTER_NAMESPACE_CLUSTER`, and
`loft-management` for the management API; the cluster, user and context entries all carry the
context's name, so running the command again replaces its own three entries and nothing else.
Everything else in the file (other entries, `preferences`, `extensions`, fields this module does
not know) is kept as it was. The key comes from `--key-file`, standard input, or `--key` (which
leaves it in the shell's history). A refused command raises ConfigError naming the flag.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import getpass
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml

from .config import ConfigError, _header_safe
from .names import DNS_SUBDOMAIN

MANAGEMENT_CONTEXT = "loft-management"
_SECTIONS = (("clusters", "cluster"), ("users", "user"), ("contexts", "context"))


@dataclass(frozen=True, slots=True)
class Target:
    """What the context points at: a cluster, a virtual cluster in it, or the management API."""

    cluster: str | None = None
    virtual_cluster: tuple[str, str] | None = None  # (namespace, name)

    @property
    def context_name(self) -> str:
        if self.cluster is None:
            return MANAGEMENT_CONTEXT
        if self.virtual_cluster is None:
            return f"loft_{self.cluster}"
        namespace, name = self.virtual_cluster
        return f"loft-vcluster_{name}_{namespace}_{self.cluster}"

    @property
    def path(self) -> str:
        if self.cluster is None:
            return "/kubernetes/management"
        if self.virtual_cluster is None:
            return f"/kubernetes/cluster/{self.cluster}"
        namespace, name = self.virtual_cluster
        return f"/kubernetes/virtualcluster/{self.cluster}/{namespace}/{name}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One context with its own cluster and user entries, as they go into the file."""

    name: str
    server: str
    token: str
    ca_data: str | None = None  # base64 PEM, as certificate-authority-data
    insecure_skip_tls_verify: bool = False

    def sections(self) -> dict[str, dict[str, Any]]:
        cluster: dict[str, Any] = {"server": self.server}
        if self.ca_data is not None:
            cluster["certificate-authority-data"] = self.ca_data
        if self.insecure_skip_tls_verify:
            cluster["insecure-skip-tls-verify"] = True
        return {"clusters": {"name": self.name, "cluster": cluster},
                "users": {"name": self.name, "user": {"token": self.token}},
                "contexts": {"name": self.name, "context": {"cluster": self.name, "user": self.name}}}


def parse_server(value: str) -> str:
    """The gateway's base URL without a trailing slash; only https:// (the key travels in it)."""
    url = urlsplit(value)
    try:
        port_ok = url.port is None or url.port > 0
    except ValueError:
        port_ok = False
    if url.scheme != "https" or not url.hostname or not port_ok or url.path not in ("", "/") \
            or url.query or url.fragment or url.username or url.password:
        raise ConfigError(f"--server: must be an https://HOST[:PORT] URL, not {value!r}")
    return f"https://{url.netloc}"


def parse_target(cluster: str | None, virtual_cluster: str | None, management: bool) -> Target:
    if management:
        if cluster is not None or virtual_cluster is not None:
            raise ConfigError("--management: cannot be combined with --cluster or --virtual-cluster")
        return Target()
    if cluster is None:
        raise ConfigError("--cluster: is required (or --management)")
    if not DNS_SUBDOMAIN.match(cluster):
        raise ConfigError(f"--cluster: must be a lower-case DNS name, not {cluster!r}")
    if virtual_cluster is None:
        return Target(cluster)
    namespace, slash, name = virtual_cluster.partition("/")
    if not slash or not DNS_SUBDOMAIN.match(namespace) or not DNS_SUBDOMAIN.match(name):
        raise ConfigError(f"--virtual-cluster: must be NAMESPACE/NAME, lower-case DNS names, not {virtual_cluster!r}")
    return Target(cluster, (namespace, name))


def kubeconfig_path(environ: Mapping[str, str], home: str) -> str:
    """The file kubectl writes to: the first entry of $KUBECONFIG, else ~/.kube/config."""
    for entry in environ.get("KUBECONFIG", "").split(os.pathsep):
        if entry:
            return entry
    return os.path.join(home, ".kube", "config")


def merge(document: Any, entry: Entry, where: str) -> dict[str, Any]:
    """`document` (a loaded kubeconfig, or None) with `entry`'s three entries replacing any
    entries of the same name, every other entry and field kept, and the context made current."""
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"{where}: is not a kubeconfig (not a mapping)")
    merged = {"apiVersion": "v1", "kind": "Config", **document}
    for section, new in entry.sections().items():
        existing = merged.get(section) or []
        if not isinstance(existing, list):
            raise ConfigError(f"{where}: {section}: must be a list")
        kept = [item for item in existing if not (isinstance(item, dict) and item.get("name") == entry.name)]
        merged[section] = [*kept, new]
    merged["current-context"] = entry.name
    return merged


def write_atomically(path: str, text: str) -> None:
    """Replace `path` (through a symbolic link, as kubectl does) by a 0600 file holding `text`:
    written to a temporary file beside it, then renamed over it, so no reader sees half a file."""
    path = os.path.realpath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".kubeconfig-")  # mode 0600
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


@contextlib.contextmanager
def kubectl_lock(path: str, wait: float = 1.0) -> Iterator[None]:
    """Hold PATH.lock, the lock file kubectl (client-go) creates while it modifies a kubeconfig,
    so that neither overwrites what the other just wrote."""
    lock = path + ".lock"
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        try:
            os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise ConfigError(f"KUBECONFIG: {lock} exists: kubectl or another command is writing {path} "
                                  "(remove the lock if nothing is)") from None
            time.sleep(0.05)
        except OSError as error:
            raise ConfigError(f"KUBECONFIG: {lock}: {error.strerror}") from None
    try:
        yield
    finally:
        os.unlink(lock)


def _read(path: str) -> Any:
    try:
        with open(path, "rb") as file:
            return yaml.safe_load(file)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ConfigError(f"KUBECONFIG: {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"KUBECONFIG: {path}: not YAML: {' '.join(str(error).split())}") from None


def _read_key(args: argparse.Namespace) -> str:
    if args.key is not None and args.key_file is not None:
        raise ConfigError("--key: cannot be combined with --key-file")
    if args.key is not None:
        return _header_safe("--key", args.key)
    if args.key_file is not None:
        try:
            with open(args.key_file) as file:
                return _header_safe("--key-file", file.readline().rstrip("\r\n"))
        except OSError as error:
            raise ConfigError(f"--key-file: {args.key_file}: {error.strerror}") from None
    if sys.stdin.isatty():
        return _header_safe("standard input", getpass.getpass("access key: "))
    return _header_safe("standard input (no --key-file or --key)", sys.stdin.readline().rstrip("\r\n"))


def _read_ca(path: str) -> str:
    from cryptography import x509
    try:
        with open(path, "rb") as file:
            pem = file.read()
        x509.load_pem_x509_certificates(pem)
    except OSError as error:
        raise ConfigError(f"--certificate-authority: {path}: {error.strerror}") from None
    except ValueError:
        raise ConfigError(f"--certificate-authority: {path}: holds no PEM certificate") from None
    return base64.b64encode(pem).decode()


def kubeconfig_command(args: argparse.Namespace) -> int:
    server = parse_server(args.server)
    target = parse_target(args.cluster, args.virtual_cluster, args.management)
    if args.certificate_authority is not None and args.insecure_skip_tls_verify:
        raise ConfigError("--insecure-skip-tls-verify: cannot be combined with --certificate-authority")
    ca_data = None if args.certificate_authority is None else _read_ca(args.certificate_authority)
    entry = Entry(target.context_name, server + target.path, _read_key(args), ca_data, args.insecure_skip_tls_verify)
    path = kubeconfig_path(os.environ, os.path.expanduser("~"))
    with kubectl_lock(path):
        document = merge(_read(path), entry, f"KUBECONFIG: {path}")
        write_atomically(path, yaml.safe_dump(document, sort_keys=False, default_flow_style=False))
    print(f"context {entry.name!r} written to {path} and made current")
    return 0


def add_kubeconfig_command(subparsers: Any) -> None:
    """Add `kubeconfig` to a parser's subparsers."""
    command = subparsers.add_parser(
        "kubeconfig", help="write or merge a context for this gateway into $KUBECONFIG (or ~/.kube/config)")
    command.add_argument("--server", required=True, metavar="https://HOST[:PORT]", help="the gateway's address")
    command.add_argument("--cluster", metavar="NAME", help="a cluster: /kubernetes/cluster/NAME")
    command.add_argument("--virtual-cluster", metavar="NAMESPACE/NAME",
                         help="a virtual cluster of --cluster: /kubernetes/virtualcluster/CLUSTER/NAMESPACE/NAME")
    command.add_argument("--management", action="store_true", help="the management API: /kubernetes/management")
    command.add_argument("--key-file", metavar="FILE", help="a file whose first line is the access key "
                         "(without --key-file or --key: the first line of standard input)")
    command.add_argument("--key", metavar="KEY", help="the access key itself (it stays in the shell's history)")
    command.add_argument("--certificate-authority", metavar="FILE",
                         help="PEM CA to verify the gateway with, embedded as certificate-authority-data")
    command.add_argument("--insecure-skip-tls-verify", action="store_true",
                         help="do not verify the gateway's certificate")
    command.set_defaults(handler=kubeconfig_command)
