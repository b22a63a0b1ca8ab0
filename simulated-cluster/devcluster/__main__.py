"""python -m devcluster --dir DIR [--listen HOST:PORT] [--rules FILE] ..."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .auth import load_rules, read_token_file
from .server import Options, serve
from .services import parse_service_map


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:0 or [::1]:6443), got {text!r}")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devcluster",
        description="A simulated Kubernetes API server for demos and end-to-end tests.")
    parser.add_argument("--dir", required=True, type=Path,
                        help="state directory: CA, certificates, tokens and ready.json")
    parser.add_argument("--listen", type=_listen_address, default=("127.0.0.1", 0),
                        help="HOST:PORT to listen on (default 127.0.0.1:0, a free port)")
    parser.add_argument("--rules", type=Path,
                        help="JSON list of authorisation rules, added to the built-in ones "
                             "(system:masters may do anything; the gateway may impersonate)")
    parser.add_argument("--token-auth-file", type=Path,
                        help='extra bearer tokens, CSV lines: token,user,uid,"group1,group2"')
    parser.add_argument("--activity-rate", type=float, default=0.0,
                        help="configmap changes per second made in the background (default 0)")
    parser.add_argument("--watch-history", type=int, default=1000,
                        help="changes kept for watch resumption; older versions get 410 Expired")
    parser.add_argument("--seed", action=argparse.BooleanOptionalAction, default=True,
                        help="start with demo namespaces, pods, configmaps and a deployment")
    parser.add_argument("--service", action="append", default=[], metavar="NS/NAME=DIR",
                        help="serve the service proxy of service NAME in namespace NS by another "
                             "devcluster, named by its --dir (a virtual cluster); repeatable")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request to stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.activity_rate < 0 or args.watch_history < 1:
        print("devcluster: --activity-rate must not be negative, --watch-history must be positive",
              file=sys.stderr)
        return 2
    try:
        rules = load_rules(args.rules) if args.rules else []
        tokens = read_token_file(args.token_auth_file) if args.token_auth_file else {}
        services = parse_service_map(args.service)
    except (OSError, ValueError) as exc:
        print(f"devcluster: {exc}", file=sys.stderr)
        return 2
    host, port = args.listen
    asyncio.run(serve(Options(args.dir, host, port, rules, tokens, args.activity_rate, args.seed,
                              args.watch_history, services)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
