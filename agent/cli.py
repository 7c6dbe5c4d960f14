"""`latfarm-agent`: command-line entry point of the measurement agent."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from agent import __version__
from agent.settings import ENV_VARS, AgentSettings

# setting name -> the flag that sets it
FLAGS: dict[str, str] = {
    "server": "--server",
    "token": "--token",
    "devices": "--device",
    "threads": "--threads",
    "cache_dir": "--cache-dir",
    "name": "--name",
    "max_jobs": "--max-jobs",
    "exit_when_idle": "--exit-when-idle",
    "poll_wait_s": "--poll-wait",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latfarm-agent",
        description="Lease latency-measurement jobs from a latfarm server and run them with ONNX Runtime.",
        epilog="Flags override the LATFARM_AGENT_* environment variables shown in brackets.",
    )
    parser.add_argument("--server", help=f"server base URL, e.g. http://host:8000 [{ENV_VARS['server']}]")
    parser.add_argument("--token", help=f"registration token [{ENV_VARS['token']}]")
    parser.add_argument(
        "--device",
        dest="devices",
        action="append",
        metavar="NAME",
        help=f"device name to serve; repeatable (default <hostname>-ort-<threads>t-b1) [{ENV_VARS['devices']}, comma list]",
    )
    parser.add_argument("--threads", type=int, help=f"intra-op threads per measurement (default 1) [{ENV_VARS['threads']}]")
    parser.add_argument(
        "--cache-dir", help=f"artifact cache (default ~/.cache/latfarm/artifacts) [{ENV_VARS['cache_dir']}]"
    )
    parser.add_argument("--name", help=f"agent name (default hostname) [{ENV_VARS['name']}]")
    parser.add_argument("--max-jobs", type=int, metavar="N", help="exit after N jobs")
    parser.add_argument("--exit-when-idle", action="store_true", help="exit when a poll returns no job")
    parser.add_argument("--poll-wait", type=float, metavar="S", help="long-poll wait in seconds (default: server's)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"latfarm-agent {__version__}")
    return parser


def settings_from_args(args: argparse.Namespace) -> AgentSettings:
    overrides: dict[str, Any] = {
        "server": args.server,
        "token": args.token,
        "devices": args.devices,
        "threads": args.threads,
        "cache_dir": args.cache_dir,
        "name": args.name,
        "max_jobs": args.max_jobs,
        "exit_when_idle": args.exit_when_idle or None,
        "poll_wait_s": args.poll_wait,
    }
    return AgentSettings.load(overrides)


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:  # one INFO line per long-poll request is noise
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            where = FLAGS.get(field, field or "settings")
            if field in ENV_VARS:
                where += f" or {ENV_VARS[field]}"
            message = "is required" if err["type"] == "missing" else err["msg"]
            problems.append(f"{where}: {message}")
        parser.error("; ".join(problems))  # exits with status 2

    _configure_logging(args.verbose)
    from agent.worker import Worker  # imported late: `--help` stays fast

    return Worker(settings).run()


if __name__ == "__main__":
    sys.exit(main())
