"""``gateway run | check | demo``. Argument handling only; ConfigError -> exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Sequence

from gateway import __version__
from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError
from gateway.runtime import run_loop

__all__ = ["main"]

EXIT_CONFIG_INVALID = 2


def _print_problems(exc: ConfigError) -> int:
    for problem in exc.problems:
        print(problem, file=sys.stderr)
    count = len(exc.problems)
    print(f"{count} problem{'s' if count != 1 else ''} found", file=sys.stderr)
    return EXIT_CONFIG_INVALID


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _print_problems(exc)
    print(
        f"{args.config}: ok ({len(config.routes)} routes, "
        f"{len(config.limits.overrides)} overrides, upstream {config.upstream.url})"
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _print_problems(exc)
    if config.workers > 1:
        return _run_supervisor(config, args.config)
    from gateway.server import Server

    async def serve() -> None:
        await Server(config, config_path=args.config).serve()

    try:
        run_loop(serve())
    except OSError as exc:  # e.g. the port is taken
        print(f"gateway: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _run_supervisor(config: GatewayConfig, path: str) -> int:
    # Must precede the first import of prometheus_client (gateway.workers
    # imports it): the library picks its multiprocess value store at import.
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from gateway.workers import Supervisor

    async def serve() -> None:
        await Supervisor(config, path, metrics_dir).serve()

    try:
        run_loop(serve())
    except OSError as exc:
        print(f"gateway: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from gateway.workers import run_worker

    try:
        run_worker(args.config, args.fd, args.index, args.ready_fd)
    except ConfigError as exc:
        return _print_problems(exc)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    try:
        run_loop(run_demo(args.listen, args.admin))
    except OSError as exc:
        print(f"gateway demo: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line: run, check, demo (and worker, for the supervisor)."""
    parser = argparse.ArgumentParser(
        prog="gateway", description="A rate-limited HTTP reverse proxy."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve with a config file")
    run.add_argument("--config", required=True, metavar="PATH")
    run.set_defaults(func=_cmd_run)
    check = sub.add_parser("check", help="validate a config file (exit 2 if invalid)")
    check.add_argument("--config", required=True, metavar="PATH")
    check.set_defaults(func=_cmd_check)
    demo = sub.add_parser("demo", help="run a bundled demo upstream with the gateway in front")
    demo.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    demo.add_argument("--admin", default="127.0.0.1:9090", metavar="HOST:PORT")
    demo.set_defaults(func=_cmd_demo)
    # Internal: started by the supervisor for `workers: N`.
    worker = sub.add_parser("worker")
    worker.add_argument("--config", required=True)
    worker.add_argument("--fd", type=int, required=True)
    worker.add_argument("--index", type=int, default=0)
    worker.add_argument("--ready-fd", type=int, default=None)
    worker.set_defaults(func=_cmd_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``gateway ...``: the exit status (0, 2 for an invalid config)."""
    args = build_parser().parse_args(argv)
    if args.command in ("run", "worker"):
        # SIGHUP's default action kills the process. A reload sent while the
        # process is still starting (before the event loop installs its
        # handler) must not: ignore it until then. Workers inherit this
        # across exec, which covers their start-up too.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    result: int = args.func(args)
    return result
