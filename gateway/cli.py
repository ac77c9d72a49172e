"""``gateway run | check | demo``: argument handling and exit statuses.

Exit statuses: 0 done; 1 a failed start (a port taken, an unreadable file the
server opens), one line on stderr; 2 an invalid config, every problem as
``PATH:LINE:COL: key.path: message``; 64 (``EX_USAGE`` of sysexits.h) a usage
error, such as an unknown option or no config file to be found.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from typing import Final, NoReturn

from gateway import __version__, request_path_build
from gateway.config import GatewayConfig, load_config
from gateway.config.tls import TlsPairError
from gateway.errors import ConfigError
from gateway.runtime import run_loop

__all__ = [
    "CONFIG_SEARCH_PATH",
    "EXIT_CONFIG_INVALID",
    "EXIT_START_FAILED",
    "EXIT_USAGE",
    "build_parser",
    "find_config",
    "main",
]

EXIT_START_FAILED: Final = 1
EXIT_CONFIG_INVALID: Final = 2
EXIT_USAGE: Final = 64  # sysexits.h EX_USAGE

# Where `run` and `check` look for a config when none is named, in order.
CONFIG_SEARCH_PATH: Final = ("./gateway.yaml", "/etc/ratelimit-gateway/gateway.yaml")

LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")

# Commands listed by --help; `worker` (started by the supervisor for
# `workers: N`) works but is not listed.
_PUBLIC_COMMANDS: Final = ("run", "check", "demo")


class UsageError(Exception):
    """The command line cannot be acted on: exit 64 with the usage line."""


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 64 (EX_USAGE), not argparse's 2: 2 means an invalid
    config, and scripts tell the two apart."""

    def error(self, message: str) -> NoReturn:
        # argparse lists every choice of the command argument, the hidden one too.
        message = message.replace(", 'worker'", "")
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def find_config(
    config: str | None, file: str | None, search: Sequence[str] = CONFIG_SEARCH_PATH
) -> tuple[str, bool]:
    """The config file to read and whether it was found by searching
    ``search`` (neither ``--config`` nor a positional FILE given)."""
    if config is not None and file is not None and config != file:
        raise UsageError(f"two config files given ({config} and {file}); give one")
    named = config if config is not None else file
    if named is not None:
        return named, False
    for candidate in search:
        if os.path.exists(candidate):
            return candidate, True
    raise UsageError(f"no config file: give --config PATH (looked for {' and '.join(search)})")


def _config_of(args: argparse.Namespace) -> tuple[str, bool]:
    try:
        return find_config(args.config, args.file)
    except UsageError as exc:
        parser: argparse.ArgumentParser = args.parser
        parser.error(str(exc))


def _print_problems(exc: ConfigError) -> int:
    for problem in exc.problems:
        print(problem, file=sys.stderr)
    count = len(exc.problems)
    print(f"{_count(count, 'problem')} found", file=sys.stderr)
    return EXIT_CONFIG_INVALID


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _start_failed(exc: OSError, command: str = "gateway") -> int:
    """One line for a start that failed: the reason, without ``[Errno N]``."""
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        reason = f"{reason}: {exc.filename}"
    print(f"{command}: cannot start: {reason}", file=sys.stderr)
    return EXIT_START_FAILED


def _cmd_check(args: argparse.Namespace) -> int:
    path, searched = _config_of(args)
    if searched:
        print(f"no --config given; checking {path}")
    try:
        config = load_config(path)
    except ConfigError as exc:
        return _print_problems(exc)
    print(
        f"{path}: ok ({_count(len(config.routes), 'route')}, "
        f"{_count(len(config.limits.overrides), 'override')}, "
        f"upstream {config.upstream.describe()})"
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    path, searched = _config_of(args)
    if searched:
        print(f"gateway: no --config given; using {path}", file=sys.stderr)
    try:
        config = load_config(path)
    except ConfigError as exc:
        return _print_problems(exc)
    if config.workers > 1:
        return _run_supervisor(config, path)
    from gateway.server import Server

    async def serve() -> None:
        await Server(config, config_path=path).serve()

    try:
        run_loop(serve())
    except OSError as exc:  # e.g. the port is taken
        return _start_failed(exc)
    except TlsPairError as exc:  # its files changed since they were checked
        return _start_failed(OSError(None, str(exc)))
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
        return _start_failed(exc)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from gateway.workers import run_worker

    try:
        run_worker(args.config, args.fd, args.index, args.ready_fd)
    except ConfigError as exc:
        return _print_problems(exc)
    except TlsPairError as exc:
        return _start_failed(OSError(None, str(exc)), "gateway worker")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import run_demo

    try:
        run_loop(run_demo(args.listen, args.admin))
    except OSError as exc:
        return _start_failed(exc, "gateway demo")
    return 0


def _add_log_level(parser: argparse.ArgumentParser, default: str, more: str = "") -> None:
    parser.add_argument(
        "--log-level",
        default=default,
        type=str.upper,
        choices=LOG_LEVELS,
        metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS)} (default INFO){more}",
    )


def _add_config(parser: argparse.ArgumentParser) -> None:
    searched = " then ".join(CONFIG_SEARCH_PATH)
    parser.add_argument(
        "--config", metavar="PATH", help=f"the config file (default: {searched})"
    )
    parser.add_argument("file", nargs="?", metavar="FILE", help="the same as --config FILE")


def build_parser() -> argparse.ArgumentParser:
    """The command line: run, check, demo (and worker, for the supervisor)."""
    parser = _Parser(
        prog="gateway",
        description="A rate-limited HTTP reverse proxy.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "without --config (or FILE), the config is the first of:\n  "
            + "\n  ".join(CONFIG_SEARCH_PATH)
            + "\n\nexit status: 0 ok, 1 failed to start, 2 invalid config, 64 usage error"
        ),
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"ratelimit-gateway {__version__}, request path {request_path_build()}",
    )
    _add_log_level(parser, "INFO", "; also accepted after the command")
    # --log-level after the command too; SUPPRESS keeps the value given
    # before it when it is not repeated.
    common = _Parser(add_help=False)
    _add_log_level(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{" + ",".join(_PUBLIC_COMMANDS) + "}"
    )

    def command(name: str, help: str | None = None) -> argparse.ArgumentParser:
        # A command given no help is left out of --help's list; help=SUPPRESS
        # would print "==SUPPRESS==" there (Python 3.11).
        if help is None:
            child: argparse.ArgumentParser = sub.add_parser(name, parents=[common])
        else:
            child = sub.add_parser(name, parents=[common], help=help)
        child.set_defaults(parser=child)
        return child

    run = command("run", help="serve with a config file (SIGHUP reloads, SIGTERM drains)")
    _add_config(run)
    run.set_defaults(func=_cmd_run)
    check = command(
        "check", help="validate a config file: exit 0, or 2 with every problem listed"
    )
    _add_config(check)
    check.set_defaults(func=_cmd_check)
    demo = command("demo", help="run a bundled demo upstream with the gateway in front")
    demo.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT")
    demo.add_argument("--admin", default="127.0.0.1:9090", metavar="HOST:PORT")
    demo.set_defaults(func=_cmd_demo)
    # Internal: started by the supervisor for `workers: N`; not listed.
    worker = command("worker")
    worker.add_argument("--config", required=True)
    worker.add_argument("--fd", type=int, required=True)
    worker.add_argument("--index", type=int, default=0)
    worker.add_argument("--ready-fd", type=int, default=None)
    worker.set_defaults(func=_cmd_worker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``gateway ...``: the exit status (see the module docstring)."""
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
