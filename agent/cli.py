"""`latfarm-agent`: command-line entry point of the measurement agent.

Exit codes (in `--help` too, from EPILOG, and in README's CLI section): 0 stopped normally (a
signal, --max-jobs reached, idle with --exit-when-idle); 1 cannot serve (the runtime or execution
provider is missing, another agent holds the state directory, the server refused the registration
or the agent token); 2 usage or settings error. An unreachable server is not an exit: the agent
retries with backoff until it is stopped.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent import __version__
from agent.capabilities import CPU_PROVIDER
from agent.protocol import Runtime
from agent.settings import (
    DEFAULT_CACHE_DIR,
    DEFAULT_CACHE_MAX_MB,
    DEFAULT_STATE_DIR,
    ENV_VARS,
    AgentSettings,
    mb_to_bytes,
)

# setting name -> the flag that sets it
FLAGS: dict[str, str] = {
    "server": "--server",
    "token": "--token",
    "devices": "--device",
    "threads": "--threads",
    "runtime": "--runtime",
    "provider": "--provider",
    "cache_dir": "--cache-dir",
    "cache_max_bytes": "--cache-max-mb",
    "state_dir": "--state-dir",
    "name": "--name",
    "max_jobs": "--max-jobs",
    "exit_when_idle": "--exit-when-idle",
    "poll_wait_s": "--poll-wait",
}


EPILOG = f"""\
Flags override the LATFARM_AGENT_* environment variables shown in brackets.

Examples:
  # serve this machine's CPU (one thread) for a farm; the token is the admin or a registration token
  latfarm-agent --server http://farm:8000 --token-file /etc/latfarm/registration-token
  # a GPU host measured with ONNX Runtime's CUDA provider, its state kept across restarts
  {ENV_VARS['token']}="$TOKEN" latfarm-agent --server http://farm:8000 --device a100-ort-cuda-b1 \\
                --provider CUDAExecutionProvider --state-dir /var/lib/latfarm-agent
  # a batch run: measure what is queued, then exit
  {ENV_VARS['server']}=http://farm:8000 {ENV_VARS['token']}=... latfarm-agent --exit-when-idle

Exit codes:
  0  stopped normally: a signal, --max-jobs reached, or idle with --exit-when-idle
  1  cannot serve: runtime or provider missing, state directory in use, registration refused
  2  usage or settings error
An unreachable server is not an exit: the agent retries with backoff until it is stopped.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latfarm-agent",
        description="Lease latency-measurement jobs from a latfarm server and time them with ONNX Runtime "
        "or PyTorch (when installed), each in a child process of its own.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--server", help=f"server base URL, e.g. http://host:8000 [{ENV_VARS['server']}]")
    parser.add_argument(
        "--token",
        help=f"registration token; used when no agent token is stored for the server, or it is refused. "
        f"A flag is visible to every user of the host in `ps`: prefer {ENV_VARS['token']} or --token-file "
        f"[{ENV_VARS['token']}]",
    )
    parser.add_argument(
        "--token-file", type=Path, metavar="PATH",
        help="read the registration token from this file (surrounding whitespace ignored), instead of --token",
    )
    parser.add_argument(
        "--device",
        dest="devices",
        action="append",
        metavar="NAME",
        help="device name to serve; repeatable (default <hostname>-<ort|torch>-<threads>t-b1) "
        f"[{ENV_VARS['devices']}, comma list]",
    )
    parser.add_argument("--threads", type=int, help=f"intra-op threads per measurement (default 1) [{ENV_VARS['threads']}]")
    parser.add_argument(
        "--runtime",
        choices=[r.value for r in Runtime],
        help=f"runtime the devices measure with (default {Runtime.onnxruntime.value}; "
        f"{Runtime.pytorch.value} needs torch installed) [{ENV_VARS['runtime']}]",
    )
    parser.add_argument(
        "--provider",
        metavar="NAME",
        help=f"ONNX Runtime execution provider, e.g. CUDAExecutionProvider, with the CPU provider as fallback "
        f"(default {CPU_PROVIDER}) [{ENV_VARS['provider']}]",
    )
    parser.add_argument(
        "--cache-dir", help=f"artifact cache (default {DEFAULT_CACHE_DIR}) [{ENV_VARS['cache_dir']}]"
    )
    parser.add_argument(
        "--cache-max-mb",
        type=float,
        metavar="MB",
        help=f"size cap of the artifact cache; least recently used files go first (default {DEFAULT_CACHE_MAX_MB}) "
        f"[{ENV_VARS['cache_max_bytes']}]",
    )
    parser.add_argument(
        "--state-dir",
        help=f"agent state: stored credentials and results not yet acknowledged by the server "
        f"(default {DEFAULT_STATE_DIR}) [{ENV_VARS['state_dir']}]",
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
        "token": args.token_file.read_text().strip() if args.token_file else args.token,
        "devices": args.devices,
        "threads": args.threads,
        "runtime": args.runtime,
        "provider": args.provider,
        "cache_dir": args.cache_dir,
        "cache_max_bytes": None if args.cache_max_mb is None else mb_to_bytes(args.cache_max_mb),
        "state_dir": args.state_dir,
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
    if args.token and args.token_file:
        parser.error("give --token or --token-file, not both")
    try:
        settings = settings_from_args(args)
    except OSError as exc:
        parser.error(f"--token-file: {exc}")
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
