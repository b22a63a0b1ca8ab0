"""The `fastproxy` command."""
from __future__ import annotations

import argparse
import sys

from .auth.commands import add_token_commands
from .auth.identity import key_digest
from .config import ConfigError, load_config
from .kubeconfig import add_kubeconfig_command
from .reload import add_reload_command
from .store.commands import add_commands
from .store.migrate import add_migrate_command


def _serve(args) -> int:
    from .server import configure_logging, serve
    config = load_config(args.config)
    configure_logging(config.server.log_level)
    return serve(config)


def _check_config(args) -> int:
    config = load_config(args.config)
    print(f"{args.config}: ok ({len(config.clusters)} clusters, {len(config.access_keys)} access keys)")
    return 0


def _demo(args) -> int:
    from .demo import run_demo
    return run_demo(args.dir, args.listen, args.activity_rate)


def _hash_key(args) -> int:
    key = sys.stdin.readline().strip()
    if not key:
        raise ConfigError("hash-key: no key on standard input")
    print(key_digest(key).hex())
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastproxy", description="Multi-cluster Kubernetes API gateway")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    serve.set_defaults(handler=_serve)
    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("config", metavar="FILE")
    check.set_defaults(handler=_check_config)
    demo = commands.add_parser("demo", help="run a simulated cluster behind the gateway, with keys and a kubeconfig")
    demo.add_argument("--dir", default=".fastproxy", help="state folder (default ./.fastproxy)")
    demo.add_argument("--listen", default="127.0.0.1:8443", metavar="HOST:PORT")
    demo.add_argument("--activity-rate", type=float, default=1.0, metavar="N",
                      help="object changes per second in the simulated cluster (default 1)")
    demo.set_defaults(handler=_demo)
    hash_key = commands.add_parser("hash-key", help="print the key_sha256 of an access key read from stdin")
    hash_key.set_defaults(handler=_hash_key)
    add_commands(commands)        # user, team, accesskey, activity: the state file
    add_migrate_command(commands)  # state migrate: SQLite to etcd
    add_token_commands(commands)  # token issue, jwks, revoke
    add_kubeconfig_command(commands)
    add_reload_command(commands)  # reload: SIGHUP to the running gateway
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"fastproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
