"""The deploy files, checked without a Docker engine.

`docker-compose.yml` is parsed with PyYAML and checked against the parts of the Compose schema it
uses (and by `docker compose config -q` where a Compose client is installed); the Dockerfiles are
parsed line by line. The checks tie them to the code: compose's environment names are settings of
the server (`LATFARM_*`) or of the agent (`LATFARM_AGENT_*`), the containers' commands parse with
the real `latfarm` and `latfarm-agent` CLIs, and they are the commands the README documents and
that `scripts/` and `.ci/run` use. Each checker is also run on a broken copy, to show it fails.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomllib
import typer.main
import yaml

import agent.cli
from agent.settings import ENV_VARS as AGENT_ENV_VARS
from agent.settings import AgentSettings, mb_to_bytes
from server.cli.commands import app as latfarm_app
from server.settings import Settings
from tests.helpers import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
README = (REPO / "README.md").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
EXTRAS = PYPROJECT["project"]["optional-dependencies"]

SERVER_ENV = {"LATFARM_" + name.upper() for name in Settings.model_fields}
AGENT_ENV = set(AGENT_ENV_VARS.values())
# what the server stack would drag into the agent image
HEAVY = {"torch", "fastapi", "uvicorn", "sqlalchemy", "alembic", "psycopg", "typer", "scipy", "matplotlib", "onnx"}
FAKE_TOKEN = "compose-test-token"


# --------------------------------------------------------------------------- parsing helpers


@dataclass
class Dockerfile:
    path: Path
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), continuations joined

    def all(self, name: str) -> list[str]:
        return [args for instr, args in self.instructions if instr == name]

    def last(self, name: str) -> str | None:
        found = self.all(name)
        return found[-1] if found else None

    def exec_form(self, name: str) -> list[str] | None:
        """CMD/ENTRYPOINT as an argv list (shell form becomes `sh -c ...`, as Docker runs it)."""
        args = self.last(name)
        if args is None:
            return None
        if args.startswith("["):
            value = json.loads(args)
            assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{name} is not a string list"
            return value
        return ["/bin/sh", "-c", args]

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            words = shlex.split(args)
            if words and "=" not in words[0]:  # legacy `ENV KEY value`
                values[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                key, sep, value = word.partition("=")
                assert sep, f"ENV word without '=': {word!r}"
                values[key] = value
        return values

    def run_commands(self) -> list[list[str]]:
        """Every simple command of every RUN (split on && ; ||), as argv lists."""
        commands = []
        for args in self.all("RUN"):
            for part in re.split(r"&&|\|\||;", args):
                words = shlex.split(part)
                if words:
                    commands.append(words)
        return commands

    def pip_installs(self) -> list[list[str]]:
        """The arguments (options dropped, with their values) of each `pip install`."""
        installs = []
        for words in self.run_commands():
            if "pip" in [Path(w).name for w in words[:3]] and "install" in words:
                rest = words[words.index("install") + 1 :]
                targets, skip = [], False
                for word in rest:
                    if skip:
                        skip = False
                    elif word in ("--index-url", "-i", "--extra-index-url", "-r", "-c", "--constraint"):
                        skip = True
                    elif not word.startswith("-"):
                        targets.append(word)
                installs.append(targets)
        return installs

    def copied_sources(self) -> set[str]:
        sources: set[str] = set()
        for args in self.all("COPY") + self.all("ADD"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources.update(w.rstrip("/").removeprefix("./") for w in words[:-1])
        return sources

    def final_user(self) -> str | None:
        return self.last("USER")


def parse_dockerfile(path: Path) -> Dockerfile:
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comment lines inside a continuation are dropped
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if not line:
            continue
        instr, _, args = line.partition(" ")
        assert re.fullmatch(r"[A-Za-z]+", instr), f"{path.name}: not an instruction: {line!r}"
        instructions.append((instr.upper(), args.strip()))
    assert not pending, f"{path.name} ends inside a line continuation"
    return Dockerfile(path, instructions)


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


INTERPOLATION = re.compile(r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}"
                           r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: str, environ: Mapping[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}`, `$$` (no nesting, which we don't use)."""

    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("plain")
        op, arg = match.group("op"), match.group("arg") or ""
        present = name in environ and (environ[name] != "" or not (op or "").startswith(":"))
        if op and op.endswith("?") and not present:
            raise AssertionError(f"${{{name}}} is required: {arg}")
        if op and op.endswith("-") and not present:
            return arg
        if op and op.endswith("+"):
            return arg if present else ""
        return environ.get(name, "")

    stripped = INTERPOLATION.sub("", value)
    assert "$" not in stripped, f"malformed interpolation in {value!r}"
    return INTERPOLATION.sub(sub, value)


def as_argv(value: Any) -> list[str] | None:
    if value is None:
        return None
    return list(value) if isinstance(value, list) else shlex.split(value)


def env_map(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment`, list or mapping form, values as strings."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def port_of(url: str) -> int:
    match = re.match(r"https?://[^/:]+:(\d+)", url)
    assert match, f"no explicit port in {url!r}"
    return int(match.group(1))


def resolve_latfarm(argv: list[str]) -> Any:
    """Parse a `latfarm ...` command line with the real CLI, without running it."""
    assert argv[0] == "latfarm", argv
    # typer may bundle its own click: use its classes, not the `click` package's
    command: Any = typer.main.get_command(latfarm_app)
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    ctx = command.context_class(command, info_name="latfarm")
    args = list(argv[1:])
    while hasattr(command, "get_command"):  # a group
        assert args, f"{shlex.join(argv)}: no subcommand"
        name = args.pop(0)
        sub = command.get_command(ctx, name)
        assert sub is not None, f"{shlex.join(argv)}: `latfarm` has no command {name!r}"
        command = sub
        ctx = command.context_class(command, info_name=name, parent=ctx)
    try:
        return command.make_context(ctx.info_name, args, parent=ctx.parent)
    except usage_error as exc:
        raise AssertionError(f"{shlex.join(argv)}: {exc}") from exc


def shell_steps(argv: list[str]) -> list[list[str]]:
    """A container command as the list of commands it runs, in order (`sh -c 'a && exec b'`)."""
    if len(argv) >= 3 and Path(argv[0]).name in ("sh", "bash") and argv[1] == "-c":
        steps = []
        for part in re.split(r"&&|;", argv[2]):
            words = shlex.split(part)
            if words and words[0] == "exec":
                words = words[1:]
            if words:
                steps.append(words)
        assert "||" not in argv[2], "a failed step must stop the container"
        return steps
    return [argv]


def service_with_dockerfile(compose: Mapping[str, Any], dockerfile: str) -> tuple[str, dict[str, Any]]:
    found = [(name, svc) for name, svc in compose["services"].items()
             if isinstance(svc.get("build"), dict) and svc["build"].get("dockerfile") == dockerfile]
    assert len(found) == 1, f"want exactly one service built from {dockerfile}, got {[n for n, _ in found]}"
    return found[0]


def postgres_service(compose: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    found = [(name, svc) for name, svc in compose["services"].items()
             if str(svc.get("image", "")).split(":")[0].split("/")[-1] == "postgres"]
    assert len(found) == 1, f"want exactly one postgres service, got {[n for n, _ in found]}"
    return found[0]


# --------------------------------------------------------------------------- the checks

TOP_LEVEL = {"version", "name", "services", "volumes", "networks", "configs", "secrets", "include"}
SERVICE_KEYS = {
    "image", "build", "command", "entrypoint", "environment", "env_file", "volumes", "ports", "expose",
    "depends_on", "healthcheck", "restart", "hostname", "init", "user", "working_dir", "networks",
    "labels", "logging", "deploy", "platform", "stop_grace_period", "stop_signal", "container_name",
    "shm_size", "ulimits", "cap_add", "cap_drop", "devices", "read_only", "tmpfs", "extra_hosts",
    "profiles", "pull_policy", "secrets", "configs", "security_opt", "privileged", "ipc", "pid",
    "cpus", "mem_limit", "tty", "stdin_open", "gpus",
}
BUILD_KEYS = {"context", "dockerfile", "args", "target", "platforms", "cache_from", "labels", "network", "ssh"}
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
RESTART = {"no", "always", "on-failure", "unless-stopped"}
DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")
PORT = re.compile(r"^(?:(?:[\d.]+|\[[0-9a-f:]+\]):)?(?:\d+(?:-\d+)?:)?\d+(?:-\d+)?(?:/(?:tcp|udp))?$")


def check_compose_schema(compose: Mapping[str, Any]) -> None:
    """The parts of the Compose specification this file uses: keys, types, references."""
    unknown = {k for k in compose if not k.startswith("x-")} - TOP_LEVEL
    assert not unknown, f"unknown top-level keys {unknown}"
    services = compose.get("services")
    assert isinstance(services, dict) and services, "no services"
    declared_volumes = set((compose.get("volumes") or {}).keys())
    for name, svc in services.items():
        where = f"services.{name}"
        assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", name), f"bad service name {name!r}"
        assert isinstance(svc, dict), f"{where} is not a mapping"
        unknown = {k for k in svc if not k.startswith("x-")} - SERVICE_KEYS
        assert not unknown, f"{where}: unknown keys {unknown}"
        assert "image" in svc or "build" in svc, f"{where}: neither image nor build"
        if "build" in svc:
            build = svc["build"]
            if isinstance(build, str):
                build = {"context": build}
            assert set(build) <= BUILD_KEYS, f"{where}.build: unknown keys {set(build) - BUILD_KEYS}"
            context = REPO / build.get("context", ".")
            assert context.is_dir(), f"{where}.build.context {context} is not a folder"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{where}: Dockerfile not found"
        for key in ("command", "entrypoint"):
            if key in svc:
                assert isinstance(svc[key], (str, list)), f"{where}.{key} must be a string or a list"
        env = svc.get("environment")
        if env is not None:
            assert isinstance(env, (dict, list)), f"{where}.environment must be a mapping or a list"
            if isinstance(env, dict):
                for key, value in env.items():
                    assert value is None or isinstance(value, (str, int, float, bool)), f"{where}.environment.{key}"
        for port in svc.get("ports", []):
            assert isinstance(port, (str, int, dict)), f"{where}.ports: {port!r}"
            if isinstance(port, str):
                assert PORT.match(port), f"{where}.ports: bad port {port!r}"
        for volume in svc.get("volumes", []):
            if isinstance(volume, dict):
                source, target = volume.get("source"), volume.get("target")
                named = volume.get("type", "volume") == "volume"
            else:
                parts = interpolate(volume, {"LATFARM_ADMIN_TOKEN": FAKE_TOKEN}).split(":")
                assert 1 <= len(parts) <= 3, f"{where}.volumes: {volume!r}"
                if len(parts) == 1:
                    source, target, named = None, parts[0], False
                else:
                    source, target = parts[0], parts[1]
                    named = not re.match(r"^[./~$]", source)
                if len(parts) == 3:
                    assert set(parts[2].split(",")) <= {"ro", "rw", "z", "Z", "nocopy"}, f"{where}: {volume!r}"
            assert target and target.startswith("/"), f"{where}.volumes: target of {volume!r} is not absolute"
            if named and source:
                assert source in declared_volumes, f"{where}: volume {source!r} is not declared at the top level"
        depends = svc.get("depends_on", {})
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        for other, spec in depends.items():
            assert other in services, f"{where}.depends_on: no service {other!r}"
            assert other != name, f"{where} depends on itself"
            condition = (spec or {}).get("condition", "service_started")
            assert condition in CONDITIONS, f"{where}.depends_on.{other}: bad condition {condition!r}"
            if condition == "service_healthy":
                assert "healthcheck" in services[other] or other_image_has_healthcheck(services[other]), (
                    f"{where} waits for {other} to be healthy, but {other} has no healthcheck")
        if "healthcheck" in svc:
            check = svc["healthcheck"]
            assert isinstance(check, dict) and set(check) <= HEALTHCHECK_KEYS, f"{where}.healthcheck: {check!r}"
            test = check.get("test")
            assert test, f"{where}.healthcheck has no test"
            if isinstance(test, list):
                assert test[0] in ("CMD", "CMD-SHELL", "NONE"), f"{where}.healthcheck.test starts with {test[0]!r}"
                assert len(test) > 1 or test[0] == "NONE", f"{where}.healthcheck.test is empty"
            for key in ("interval", "timeout", "start_period", "start_interval"):
                if key in check:
                    assert DURATION.match(str(check[key])), f"{where}.healthcheck.{key}: bad duration {check[key]!r}"
            if "retries" in check:
                assert isinstance(check["retries"], int) and check["retries"] > 0, f"{where}.healthcheck.retries"
        if "restart" in svc:
            policy = str(svc["restart"]).split(":")[0]
            assert policy in RESTART, f"{where}.restart: {svc['restart']!r}"
        if "init" in svc:
            assert isinstance(svc["init"], bool), f"{where}.init must be a boolean"
    for name, spec in (compose.get("volumes") or {}).items():
        assert spec is None or isinstance(spec, dict), f"volumes.{name}"
    # no depends_on cycle
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"depends_on cycle: {' -> '.join(stack + (name,))}"
        if name in order:
            return
        for other in services[name].get("depends_on", {}) or {}:
            visit(other, stack + (name,))
        order.append(name)

    for name in services:
        visit(name, ())
    # every ${...} is well formed, and the file interpolates with the one variable the README names
    check_strings(compose, lambda s: interpolate(s, {"LATFARM_ADMIN_TOKEN": FAKE_TOKEN}))


def other_image_has_healthcheck(service: Mapping[str, Any]) -> bool:
    build = service.get("build")
    if not isinstance(build, dict):
        return False
    dockerfile = parse_dockerfile(REPO / build.get("context", ".") / build.get("dockerfile", "Dockerfile"))
    return dockerfile.last("HEALTHCHECK") not in (None, "NONE")


def check_strings(node: Any, check: Callable[[str], Any]) -> None:
    if isinstance(node, str):
        check(node)
    elif isinstance(node, dict):
        for value in node.values():
            check_strings(value, check)
    elif isinstance(node, list):
        for value in node:
            check_strings(value, check)


def check_postgres(compose: Mapping[str, Any]) -> None:
    name, svc = postgres_service(compose)
    env = env_map(svc)
    declared = compose.get("volumes") or {}
    named = [v for v in svc.get("volumes", []) if isinstance(v, str) and v.split(":")[0] in declared]
    assert any(v.split(":")[1].startswith("/var/lib/postgresql") for v in named), (
        f"{name}: the data folder is not on a named volume")
    test = (svc.get("healthcheck") or {}).get("test")
    assert test, f"{name} has no healthcheck"
    text = " ".join(test) if isinstance(test, list) else test
    assert "pg_isready" in text, f"{name}'s healthcheck does not run pg_isready: {text!r}"
    user = env.get("POSTGRES_USER", "postgres")
    assert f"-U {user}" in text, f"{name}'s healthcheck checks another user than {user}"
    if "POSTGRES_DB" in env:
        assert f"-d {env['POSTGRES_DB']}" in text, f"{name}'s healthcheck checks another database"


def effective_command(svc: Mapping[str, Any], dockerfile: Dockerfile) -> list[str]:
    """What the container runs: compose's entrypoint/command over the image's ENTRYPOINT/CMD."""
    entrypoint = as_argv(svc.get("entrypoint")) if "entrypoint" in svc else dockerfile.exec_form("ENTRYPOINT")
    command = as_argv(svc.get("command")) if "command" in svc else (
        dockerfile.exec_form("CMD") if "entrypoint" not in svc else None)
    argv = (entrypoint or []) + (command or [])
    assert argv, "the container has no command"
    return argv


def check_server(compose: Mapping[str, Any], dockerfile: Dockerfile) -> None:
    name, svc = service_with_dockerfile(compose, dockerfile.path.name)
    db_name, db = postgres_service(compose)
    env = {k: interpolate(v, {"LATFARM_ADMIN_TOKEN": FAKE_TOKEN}) for k, v in env_map(svc).items()}

    # the environment: real settings, pointing at the compose Postgres
    unknown = set(env) - SERVER_ENV
    assert not unknown, f"{name}: {unknown} are not server settings (LATFARM_ + a field of server.settings.Settings)"
    unknown = set(dockerfile.env()) - SERVER_ENV - {"PYTHONUNBUFFERED", "PIP_DISABLE_PIP_VERSION_CHECK", "PATH"}
    assert not unknown, f"{dockerfile.path.name}: ENV {unknown} are not server settings"
    url = env.get("LATFARM_DATABASE_URL", "")
    db_env = env_map(db)
    assert url.startswith(("postgresql://", "postgres://")), f"{name} does not use Postgres: {url!r}"
    assert f"@{db_name}:" in url or f"@{db_name}/" in url, f"{name}'s database URL does not point at {db_name}"
    assert url.rsplit("/", 1)[1] == db_env.get("POSTGRES_DB", db_env.get("POSTGRES_USER", "postgres"))
    assert url.split("://", 1)[1].split(":")[0] == db_env.get("POSTGRES_USER", "postgres")
    assert "LATFARM_ADMIN_TOKEN" in env, f"{name}: no admin token, so agents cannot register"
    merged = {**dockerfile.env(), **env}
    settings = Settings(**{k.removeprefix("LATFARM_").lower(): v for k, v in merged.items() if k in SERVER_ENV})
    assert settings.database_url == url and not settings.is_sqlite

    depends = svc.get("depends_on") or {}
    assert isinstance(depends, dict) and (depends.get(db_name) or {}).get("condition") == "service_healthy", (
        f"{name} must wait for {db_name} to be healthy")

    # the command: migrate, then serve on all interfaces, on the port that is published and checked
    steps = shell_steps(effective_command(svc, dockerfile))
    commands = [shlex.join(step) for step in steps]
    assert steps[0][:3] == ["latfarm", "db", "upgrade"], f"{name} does not migrate first: {commands}"
    assert steps[-1][:2] == ["latfarm", "server"], f"{name} does not end by serving: {commands}"
    assert len(steps) == 2, f"{name}: unexpected extra steps {commands}"
    for step in steps:
        resolve_latfarm(step)
    serve = resolve_latfarm(steps[-1]).params
    assert serve["host"] == "0.0.0.0", f"{name} serves on {serve['host']}, not reachable from other containers"
    port = serve["port"]
    expose = {int(p.split("/")[0]) for args in dockerfile.all("EXPOSE") for p in args.split()}
    assert port in expose, f"{dockerfile.path.name} serves on {port} but exposes {expose}"
    assert not svc.get("ports"), f"{name} is published on the host: clients must go through the proxy"
    check_proxy(compose, name, port)

    # the healthcheck hits /healthz on that port, and the app has that route
    test = (svc.get("healthcheck") or {}).get("test") or (dockerfile.last("HEALTHCHECK") or "")
    text = " ".join(test) if isinstance(test, list) else test
    assert f":{port}/healthz" in text, f"{name}'s healthcheck does not request /healthz on port {port}: {text!r}"
    from server.app import ROUTERS

    assert "/healthz" in {route.path for router in ROUTERS for route in router.routes}, "the app has no /healthz"


def check_proxy(compose: Mapping[str, Any], server: str, port: int) -> None:
    """An nginx service publishes the farm, with deploy/nginx.conf proxying to the server's port
    (tests/live/test_hostile.py runs that configuration in front of a real server)."""
    found = [(name, svc) for name, svc in compose["services"].items() if str(svc.get("image", "")).startswith("nginx")]
    assert len(found) == 1, f"expected one nginx proxy service, found {[n for n, _ in found]}"
    name, svc = found[0]
    mounts = [str(v) for v in svc.get("volumes", [])]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in mounts, f"{name} does not mount deploy/nginx.conf: {mounts}"
    conf = (REPO / "deploy" / "nginx.conf").read_text()
    assert f"server {server}:{port};" in conf, f"deploy/nginx.conf does not proxy to {server}:{port}"
    listen = re.search(r"^\s*listen (\d+);", conf, re.MULTILINE)
    assert listen, "deploy/nginx.conf has no `listen PORT;`"
    published = [str(p).split(":")[-1].split("/")[0] for p in svc.get("ports", [])]
    assert listen.group(1) in published, f"{name} listens on {listen.group(1)} but publishes {published}"
    depends = svc.get("depends_on") or {}
    assert isinstance(depends, dict) and (depends.get(server) or {}).get("condition") == "service_healthy", (
        f"{name} must wait for {server} to be healthy")


def check_agent(compose: Mapping[str, Any], dockerfile: Dockerfile, server_dockerfile: Dockerfile) -> None:
    name, svc = service_with_dockerfile(compose, dockerfile.path.name)
    server_name, server_svc = service_with_dockerfile(compose, server_dockerfile.path.name)
    env = {k: interpolate(v, {"LATFARM_ADMIN_TOKEN": FAKE_TOKEN}) for k, v in env_map(svc).items()}
    unknown = set(env) - AGENT_ENV
    assert not unknown, f"{name}: {unknown} are not agent settings (agent.settings.ENV_VARS)"
    unknown = set(dockerfile.env()) - AGENT_ENV - {"PYTHONUNBUFFERED", "PIP_DISABLE_PIP_VERSION_CHECK", "PATH"}
    assert not unknown, f"{dockerfile.path.name}: ENV {unknown} are not agent settings"

    depends = svc.get("depends_on") or {}
    assert isinstance(depends, dict) and (depends.get(server_name) or {}).get("condition") == "service_healthy", (
        f"{name} must wait for {server_name} to be healthy")

    # the entrypoint is the agent CLI, and with compose's command and environment it has valid settings
    argv = effective_command(svc, dockerfile)
    assert argv[0] == "latfarm-agent", f"{name} does not run latfarm-agent: {argv}"
    args = agent.cli.build_parser().parse_args(argv[1:])
    assert args.token is None, f"{name} passes its token on the command line; use {AGENT_ENV_VARS['token']}"
    overrides = {  # as agent.cli.settings_from_args, over this container's environment
        "server": args.server, "token": args.token, "devices": args.devices, "threads": args.threads,
        "runtime": args.runtime, "provider": args.provider, "cache_dir": args.cache_dir,
        "cache_max_bytes": None if args.cache_max_mb is None else mb_to_bytes(args.cache_max_mb),
        "state_dir": args.state_dir, "name": args.name, "max_jobs": args.max_jobs,
        "exit_when_idle": args.exit_when_idle or None, "poll_wait_s": args.poll_wait,
    }
    settings = AgentSettings.load(overrides, environ={**dockerfile.env(), **env})
    assert settings.token == FAKE_TOKEN, f"{name} registers with another token than the server's admin token"
    server_env = env_map(server_svc)
    assert env.get(AGENT_ENV_VARS["token"]) == interpolate(server_env["LATFARM_ADMIN_TOKEN"],
                                                           {"LATFARM_ADMIN_TOKEN": FAKE_TOKEN})
    assert settings.server.startswith(f"http://{server_name}:"), f"{name} talks to {settings.server}, not {server_name}"
    serve = resolve_latfarm(shell_steps(effective_command(server_svc, server_dockerfile))[-1]).params
    assert port_of(settings.server) == serve["port"], f"{name} talks to port {port_of(settings.server)}"

    # the state (credentials, unsent results) and the cache live on named volumes
    mounts = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", []) if isinstance(v, str) and ":" in v}
    declared = compose.get("volumes") or {}
    for setting in ("state_dir", "cache_dir"):
        folder = str(getattr(settings, setting))
        assert mounts.get(folder) in declared, f"{name}: {setting} {folder} is not on a named volume"


def check_server_image(dockerfile: Dockerfile) -> None:
    base = dockerfile.all("FROM")
    assert len(base) == 1 and re.fullmatch(r"python:3\.\d+-slim", base[0]), f"server base image {base}"
    installs = dockerfile.pip_installs()
    assert [".[server]"] in installs, f"the server image does not `pip install '.[server]'`: {installs}"
    for targets in installs:
        for target in targets:
            if target.startswith("torch"):
                pin = next(r for r in EXTRAS["server"] if r.startswith("torch"))
                assert target == pin, f"{dockerfile.path.name} installs {target}, pyproject pins {pin}"
            else:
                assert target == ".[server]", f"{dockerfile.path.name} installs {target} beside the project"
    packages = {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = {p for p in packages if (REPO / p).is_dir()} | {"pyproject.toml", PYPROJECT["project"]["readme"]}
    missing = needed - dockerfile.copied_sources()
    assert not missing, f"{dockerfile.path.name} does not copy {missing}, which the install needs"
    assert dockerfile.final_user() not in (None, "root", "0"), f"{dockerfile.path.name} runs as root"


def check_agent_image(dockerfile: Dockerfile) -> None:
    base = dockerfile.all("FROM")
    # the official python images are multi-arch (amd64 and arm64); a pinned platform would break that
    assert len(base) == 1 and re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base[0]), f"agent base image {base}"
    installs = dockerfile.pip_installs()
    assert installs == [[".[agent]"]], f"the agent image must install the agent extra alone: {installs}"
    assert not any(w.startswith("torch") for cmd in dockerfile.run_commands() for w in cmd), "torch in the agent image"
    copied = dockerfile.copied_sources()
    assert "agent" in copied and {"server", "predictor", "migrations", "."}.isdisjoint(copied), (
        f"{dockerfile.path.name} copies {copied}: the agent image needs the agent package only")
    requirement_names = {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in EXTRAS["agent"]}
    assert not requirement_names & (HEAVY | {"latfarm"}), f"the agent extra pulls in {requirement_names & HEAVY}"
    entrypoint = dockerfile.exec_form("ENTRYPOINT")
    assert entrypoint and entrypoint[0] in SCRIPTS, f"the agent entrypoint {entrypoint} is not a [project.scripts] name"
    assert SCRIPTS[entrypoint[0]] == "agent.cli:main" and callable(agent.cli.main)
    assert dockerfile.final_user() not in (None, "root", "0"), f"{dockerfile.path.name} runs as root"
    volumes = set(json.loads(dockerfile.last("VOLUME") or "[]"))
    env = dockerfile.env()
    for setting in ("cache_dir", "state_dir"):
        assert env.get(AGENT_ENV_VARS[setting]) in volumes, f"{dockerfile.path.name}: {setting} is not a VOLUME"


# --------------------------------------------------------------------------- tests on the real files


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def server_image() -> Dockerfile:
    return parse_dockerfile(REPO / "Dockerfile.server")


@pytest.fixture(scope="module")
def agent_image() -> Dockerfile:
    return parse_dockerfile(REPO / "Dockerfile.agent")


def compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file() -> None:
    """The Compose client's own validation (no engine needed); skipped where no client is installed."""
    client = compose_client()
    if client is None:
        pytest.skip("no `docker compose` or `docker-compose` client here")
    env = {**os.environ, "LATFARM_ADMIN_TOKEN": FAKE_TOKEN}
    result = subprocess.run([*client, "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr


def test_compose_file_follows_the_schema(compose: dict[str, Any]) -> None:
    check_compose_schema(compose)


def test_compose_needs_the_admin_token(compose: dict[str, Any]) -> None:
    with pytest.raises(AssertionError, match="LATFARM_ADMIN_TOKEN"):
        check_strings(compose, lambda s: interpolate(s, {}))


def test_postgres_has_a_volume_and_a_healthcheck(compose: dict[str, Any]) -> None:
    check_postgres(compose)


def test_server_migrates_then_serves_and_is_health_checked(compose: dict[str, Any], server_image: Dockerfile) -> None:
    check_server(compose, server_image)


def test_agent_waits_for_the_server_and_registers_with_the_environment_token(
    compose: dict[str, Any], agent_image: Dockerfile, server_image: Dockerfile
) -> None:
    check_agent(compose, agent_image, server_image)


def test_server_image(server_image: Dockerfile) -> None:
    check_server_image(server_image)


def test_agent_image_is_slim(agent_image: Dockerfile) -> None:
    check_agent_image(agent_image)


def test_dockerfile_parser_joins_continuations(tmp_path: Path) -> None:
    path = tmp_path / "Dockerfile"
    path.write_text("FROM python:3.11-slim\n# note\nRUN a \\\n    && b \\\n    # inline\n    && c\n"
                    'CMD ["sh", "-c", "x && exec y"]\n')
    parsed = parse_dockerfile(path)
    assert parsed.instructions == [("FROM", "python:3.11-slim"), ("RUN", "a && b && c"),
                                   ("CMD", '["sh", "-c", "x && exec y"]')]
    assert shell_steps(parsed.exec_form("CMD") or []) == [["x"], ["y"]]


# --------------------------------------------------------------------------- README, scripts and CI agree


def readme_section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, re.S)


def readme_setup_commands() -> list[list[str]]:
    commands = []
    for block in shell_blocks(readme_section("Set up and run")):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.append(shlex.split(line))
    return commands


def script_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.strip().startswith("#")]


def test_readme_setup_commands_are_the_scripts() -> None:
    commands = readme_setup_commands()
    assert commands, "README's setup block lists no commands"
    scripts = sorted(p.name for p in (REPO / "scripts").iterdir() if not p.name.startswith(("_", ".")))
    named = sorted(Path(c[0]).name for c in commands)
    assert named == scripts, f"README names {named}, scripts/ holds {scripts}"
    for command in commands:
        path = REPO / command[0]
        assert command[0].startswith("./scripts/") and path.is_file(), f"README runs {command[0]}: no such script"
        assert os.access(path, os.X_OK), f"{command[0]} is not executable"
        assert path.read_text().startswith("#!"), f"{command[0]} has no shebang"


def test_ci_runs_the_readme_test_command() -> None:
    ci = REPO / ".ci" / "run"
    assert os.access(ci, os.X_OK), ".ci/run is not executable"
    readme_test = next(c for c in readme_setup_commands() if Path(c[0]).name == "test")
    assert shlex.join(readme_test) in script_lines(ci), f".ci/run does not run {shlex.join(readme_test)}"
    # the README's variants of it use a marker pytest knows
    for marker in re.findall(r'-m "not (\w+)"', README):
        assert any(m.split(":")[0] == marker for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"])


def check_script(name: str, extra: str, runs: str) -> list[str]:
    lines = script_lines(REPO / "scripts" / name)
    assert ". scripts/_venv.sh" in lines, f"scripts/{name} does not use scripts/_venv.sh"
    assert f"ensure_venv {extra}" in lines, f"scripts/{name} does not install the {extra} extra"
    assert extra in EXTRAS, f"scripts/{name} installs an extra pyproject lacks: {extra}"
    final = shlex.split(lines[-1])
    assert final[0] == "exec" and shlex.join(final[1:]).startswith(runs), f"scripts/{name} ends with {lines[-1]!r}"
    return final[1:]


def test_scripts_install_and_run_what_the_readme_says() -> None:
    venv = (REPO / "scripts" / "_venv.sh").read_text()
    assert 'pip install --quiet -e ".[$extra]"' in venv, "scripts/_venv.sh no longer installs the project's extra"
    check_script("test", "dev", "python -m pytest")
    demo = check_script("demo", "server", "latfarm demo")
    resolve_latfarm([c for c in demo if c != "$@"])
    assert "./scripts/test" in README and "latfarm demo" in README


def test_readme_deploy_section_matches_the_images(server_image: Dockerfile, agent_image: Dockerfile) -> None:
    deploy = readme_section("Deploy")
    for name in ("docker-compose.yml", "Dockerfile.server", "Dockerfile.agent", "LATFARM_ADMIN_TOKEN"):
        assert name in deploy, f"README's deploy section does not mention {name}"
    steps = shell_steps(server_image.exec_form("CMD") or [])
    for step in steps:
        assert f"`{shlex.join(step[:3] if step[1] == 'db' else step[:2])}`" in deploy, (
            f"the server image runs `{shlex.join(step)}`, which README's deploy section does not name")
    assert f"`{(agent_image.exec_form('ENTRYPOINT') or [''])[0]}`" in deploy
    # the CLI reference documents the flags the images pass
    cli = shell_blocks(readme_section("CLI"))[0]
    serve_line = next(line for line in cli.splitlines() if line.startswith("latfarm server"))
    for flag in (w for w in steps[-1] if w.startswith("--")):
        assert flag in serve_line, f"the server image passes {flag}, README's `latfarm server` line lacks it"
    assert any(line.startswith("latfarm db upgrade") for line in cli.splitlines())
    # README's install line for the agent is the image's
    assert "pip install '.[agent]'" in README and agent_image.pip_installs() == [[".[agent]"]]
    # README's Python is the images'
    version = re.search(r"Python (3\.\d+)", readme_section("Set up and run"))
    assert version, "README names no Python version"
    for image in (server_image, agent_image):
        assert image.all("FROM")[0].startswith(f"python:{version.group(1)}-"), f"{image.path.name} uses another Python"


# --------------------------------------------------------------------------- the checks can fail


def _drop(path: tuple[str, ...]) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


def _set(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    return mutate


def _service(compose: dict[str, Any], dockerfile: str | None) -> str:
    if dockerfile is None:
        return postgres_service(compose)[0]
    return service_with_dockerfile(compose, dockerfile)[0]


BROKEN_COMPOSE = {
    "postgres loses its healthcheck": (None, lambda s: _drop(("services", s, "healthcheck"))),
    "postgres loses its volume": (None, lambda s: _drop(("services", s, "volumes"))),
    "server loses its healthcheck": ("Dockerfile.server", lambda s: _drop(("services", s, "healthcheck"))),
    "server starts before postgres is healthy": (
        "Dockerfile.server", lambda s: _set(("services", s, "depends_on"), [postgres_service(load_compose())[0]])),
    "server skips the migration": (
        "Dockerfile.server", lambda s: _set(("services", s, "command"), ["latfarm", "server", "--host", "0.0.0.0"])),
    "server gets an unknown setting": (
        "Dockerfile.server", lambda s: _set(("services", s, "environment", "LATFARM_DB_URL"), "x")),
    "no proxy in front": ("Dockerfile.server", lambda s: _drop(("services", "proxy"))),
    "server published past the proxy": ("Dockerfile.server", lambda s: _set(("services", s, "ports"), ["8000:8000"])),
    "agent starts before the server is healthy": ("Dockerfile.agent", lambda s: _drop(("services", s, "depends_on"))),
    "agent gets a misspelt setting": (
        "Dockerfile.agent", lambda s: _set(("services", s, "environment", "LATFARM_AGENT_TOKENS"), "x")),
    "agent token on the command line": (
        "Dockerfile.agent", lambda s: _set(("services", s, "command"), ["--token", "${LATFARM_ADMIN_TOKEN}"])),
    "undeclared volume": ("Dockerfile.agent", lambda s: _set(("services", s, "volumes"), ["nowhere:/state"])),
    "bad duration": ("Dockerfile.server", lambda s: _set(("services", s, "healthcheck", "interval"), "10 sec")),
    "bad depends_on condition": (
        "Dockerfile.agent", lambda s: _set(("services", s, "depends_on"), {"server": {"condition": "healthy"}})),
}


def check_all_compose(compose: dict[str, Any]) -> None:
    server_image = parse_dockerfile(REPO / "Dockerfile.server")
    agent_image = parse_dockerfile(REPO / "Dockerfile.agent")
    check_compose_schema(compose)
    check_postgres(compose)
    check_server(compose, server_image)
    check_agent(compose, agent_image, server_image)


@pytest.mark.parametrize("case", sorted(BROKEN_COMPOSE))
def test_a_broken_compose_file_fails(compose: dict[str, Any], case: str) -> None:
    dockerfile, mutation = BROKEN_COMPOSE[case]
    broken = copy.deepcopy(compose)
    mutation(_service(broken, dockerfile))(broken)
    with pytest.raises(AssertionError):
        check_all_compose(broken)


BROKEN_DOCKERFILES = {
    "server CMD without the migration": (
        "Dockerfile.server", 'CMD ["sh", "-c", "latfarm db upgrade && exec latfarm server --host 0.0.0.0 --port 8000"]',
        'CMD ["latfarm", "server", "--host", "0.0.0.0", "--port", "8000"]'),
    "server CMD with a wrong flag": (
        "Dockerfile.server", "--port 8000", "--listen 8000"),
    "server runs as root": ("Dockerfile.server", "USER latfarm", "USER root"),
    "agent image installs the server extra": ("Dockerfile.agent", "'.[agent]'", "'.[server]'"),
    "agent image copies the server": (
        "Dockerfile.agent", "COPY agent ./agent", "COPY agent ./agent\nCOPY server ./server"),
    "agent entrypoint is not a script": ("Dockerfile.agent", '["latfarm-agent"]', '["latfarm-worker"]'),
    "agent image on a fat base": ("Dockerfile.agent", "FROM python:3.11-slim", "FROM python:3.11"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_DOCKERFILES))
def test_a_broken_dockerfile_fails(compose: dict[str, Any], case: str, tmp_path: Path) -> None:
    name, old, new = BROKEN_DOCKERFILES[case]
    text = (REPO / name).read_text()
    assert old in text, f"{name} no longer holds {old!r}: update this case"
    path = tmp_path / name
    path.write_text(text.replace(old, new))
    broken = parse_dockerfile(path)
    server_image = broken if name == "Dockerfile.server" else parse_dockerfile(REPO / "Dockerfile.server")
    agent_image = broken if name == "Dockerfile.agent" else parse_dockerfile(REPO / "Dockerfile.agent")
    with pytest.raises(AssertionError):
        check_server_image(server_image)
        check_agent_image(agent_image)
        check_server(compose, server_image)
        check_agent(compose, agent_image, server_image)
