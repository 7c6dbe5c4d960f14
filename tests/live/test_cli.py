"""The `latfarm` and `latfarm-agent` command lines as scripts see them: help with examples, results
(JSON with --json) on stdout and nothing else there, and the documented exit codes, against a real
server and database."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import typer
from typer.testing import CliRunner, Result

from agent.cli import build_parser
from latfarm import FarmClient
from predictor import get_space
from server.cli.commands import app
from server.cli.local import free_port, running_agent, running_server
from server.cli.output import EXIT_CODE_SUMMARY, ExitCode
from server.db import upgrade
from server.settings import Settings, get_settings
from tests.helpers import ADMIN_TOKEN, REPO, onboarding_jobs

README = (REPO / "README.md").read_text()
REFERENCE = ("cli-ref-a", "cli-ref-b")
LONELY = "cli-lonely"  # a device without measurements: no predictor serves it
KEYS = [key for key in get_space("nb201").sample(80, seed=3) if get_space("nb201").is_connected(key)][:40]


def latfarm(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


@dataclass(frozen=True)
class Farm:
    url: str
    database_url: str
    pretrain: Result  # `latfarm pretrain --json` of the base predictor


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    """A server on a database of its own, which the commands that work on the database directly
    use too: two reference devices with 40 imported NB201 latencies each and a base predictor
    trained on them with `latfarm pretrain`, and a device with nothing."""
    root = tmp_path_factory.mktemp("cli")
    settings = Settings(database_url=f"sqlite:///{root / 'latfarm.db'}", artifact_dir=root / "artifacts",
                        admin_token=ADMIN_TOKEN, poll_wait_s=2.0, heartbeat_s=1.0)
    upgrade(settings.database_url)
    with running_server(settings) as url, pytest.MonkeyPatch.context() as env, admin(url) as api:
        env.setenv("LATFARM_DATABASE_URL", settings.database_url)
        get_settings.cache_clear()
        for scale, device in enumerate(REFERENCE, start=1):
            assert api.post("/devices", json={"name": device}).status_code == 201
            rows = [{"architecture": key, "latency_ms": scale * (1.0 + i / 10)} for i, key in enumerate(KEYS)]
            assert api.post("/measurements", json={"device": device, "space": "nb201", "rows": rows}).status_code == 201
        assert api.post("/devices", json={"name": LONELY}).status_code == 201
        pretrain = latfarm("pretrain", "--space", "nb201", *(f"--device={name}" for name in REFERENCE), "--json")
        assert pretrain.exit_code == 0, pretrain.output
        yield Farm(url, settings.database_url, pretrain)
    get_settings.cache_clear()


def admin(url: str) -> httpx.Client:
    return httpx.Client(base_url=f"{url}/api/v1", timeout=120, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


def assert_error(result: Result, code: ExitCode, message: str) -> None:
    """Exit `code`, one `error:` line naming `message` on stderr, no traceback, nothing on stdout."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "error:" in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


# ---------------------------------------------------------------------------------- help and docs


def _command_paths(command: object, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, (*path, name))


def test_every_command_has_help_with_examples() -> None:
    paths = list(_command_paths(typer.main.get_command(app)))
    assert {(), ("predict",), ("onboard",), ("db",), ("datasets", "import"), ("bench", "predictor")} <= set(paths)
    for path in paths:
        result = latfarm(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert "Examples" in result.stdout, f"`latfarm {' '.join(path)} --help` has no examples"
    assert "Exit codes: 0 success" in " ".join(latfarm("--help").stdout.split())
    agent_help = build_parser().format_help()
    assert "Examples:" in agent_help and "latfarm-agent --server" in agent_help and "Exit codes:" in agent_help


def test_exit_codes_are_documented_in_readme() -> None:
    table = README[README.index("## CLI"):README.index("## API")]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert documented == {code.value for code in ExitCode}
    assert set(EXIT_CODE_SUMMARY) == set(ExitCode)


# ---------------------------------------------------------------------------------- results


def test_pretrain_json_is_the_apis_predictor(farm: Farm) -> None:
    row = json.loads(farm.pretrain.stdout)  # nothing else on stdout
    assert row["kind"] == "base" and row["space"] == "nb201" and row["training_devices"] == list(REFERENCE)
    with admin(farm.url) as api:
        predictors = api.get("/predictors", params={"space": "nb201"}).json()["items"]
        listed = {predictor["id"]: predictor for predictor in predictors}
    assert listed[row["id"]] == row


def test_predict_prints_json_on_stdout_only(farm: Farm) -> None:
    base = json.loads(farm.pretrain.stdout)["id"]
    result = latfarm("predict", REFERENCE[0], "--arch", KEYS[0], "--arch", KEYS[1], "--json")
    assert result.exit_code == 0, result.output
    prediction = json.loads(result.stdout)
    assert prediction["predictor_id"] == base and prediction["architectures"] == KEYS[:2]
    assert len(prediction["latency_ms"]) == 2 and all(ms > 0 for ms in prediction["latency_ms"])
    text = latfarm("predict", REFERENCE[0], "--arch", KEYS[0])
    assert text.exit_code == 0 and text.stdout.startswith(f"predictor {base} v1 (base)\n")
    assert re.search(r"\d+\.\d{3} ms ± +\d+\.\d{3}  " + re.escape(KEYS[0]), text.stdout), text.stdout


def test_db_upgrade_json(farm: Farm) -> None:
    result = latfarm("db", "upgrade", "--json")
    assert result.exit_code == 0, result.output
    upgraded = json.loads(result.stdout)
    assert upgraded["database_url"] == farm.database_url and upgraded["revision"]
    assert latfarm("db", "upgrade").stdout == f"database is at the latest schema ({upgraded['revision']})\n"


# ---------------------------------------------------------------------------------- exit codes


def test_usage_errors_exit_2(farm: Farm) -> None:
    for args in (["predict", REFERENCE[0]], ["predict"], ["predict", REFERENCE[0], "--no-such-flag"],
                 ["onboard"], ["nonsense"]):
        result = latfarm(*args)
        assert result.exit_code == ExitCode.USAGE, (args, result.output)
        assert result.stdout == ""


def test_local_commands_map_errors_to_exit_codes(farm: Farm, tmp_path: Path) -> None:
    assert_error(latfarm("predict", "no-such-device", "--arch", KEYS[0], "--json"), ExitCode.NOT_FOUND,
                 "unknown device 'no-such-device'")
    assert_error(latfarm("predict", LONELY, "--arch", KEYS[0]), ExitCode.CONFLICT, "no predictor serves")
    assert_error(latfarm("predict", REFERENCE[0], "--arch", "|garbage|"), ExitCode.INVALID, "not a valid nb201")
    assert_error(latfarm("predict", REFERENCE[0], "--space", "nope", "--all"), ExitCode.INVALID, "nope")
    assert_error(latfarm("predict", "bad name!", "--all"), ExitCode.INVALID, "device:")
    assert_error(latfarm("pretrain", "--device", REFERENCE[0], "--device", "no-such-device"), ExitCode.INVALID,
                 "no reference measurements of nb201 on: no-such-device")
    assert_error(latfarm("pretrain", "--space", "fbnet"), ExitCode.CONFLICT, "no reference measurements")
    assert_error(latfarm("datasets", "import", str(tmp_path / "missing")), ExitCode.NOT_FOUND, "devices.csv")
    assert_error(latfarm("datasets", "import", "--space", "nope"), ExitCode.INVALID, "nope: no reference tables")


def test_import_of_a_space_without_tables_creates_no_database(tmp_path: Path) -> None:
    database = tmp_path / "never.db"
    result = CliRunner().invoke(app, ["datasets", "import", "--space", "nope"],
                                env={"LATFARM_DATABASE_URL": f"sqlite:///{database}"})
    assert_error(result, ExitCode.INVALID, "nope: no reference tables")
    assert not database.exists()


def test_onboard_maps_server_errors_to_exit_codes(farm: Farm) -> None:
    server = ["--server", farm.url, "--token", ADMIN_TOKEN]
    assert_error(latfarm("onboard", "no-such-device", *server), ExitCode.NOT_FOUND, "404")
    assert_error(latfarm("onboard", LONELY, "--space", "fbnet", *server), ExitCode.CONFLICT, "no base predictor")
    assert_error(latfarm("onboard", LONELY, "--samples", "1", *server), ExitCode.INVALID, "samples")
    assert_error(latfarm("onboard", LONELY, "--sampler", "nope", *server), ExitCode.INVALID, "nope")
    assert_error(latfarm("onboard", LONELY, "--server", farm.url, "--token", "wrong"), ExitCode.UNAUTHORIZED, "401")


def test_unreachable_server_exits_7_from_the_console_script() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    done = subprocess.run([sys.executable, "-m", "server.cli", "onboard", "dev", "--server", url, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == ExitCode.UNAVAILABLE, done.stderr
    assert f"error: cannot reach the server at {url}/" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_unreachable_database_exits_7(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LATFARM_DATABASE_URL", f"postgresql://latfarm@127.0.0.1:{free_port()}/latfarm")
    get_settings.cache_clear()
    try:
        assert_error(latfarm("predict", "any-device", "--all"), ExitCode.UNAVAILABLE, "database: ")
    finally:
        get_settings.cache_clear()


def test_bench_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    (datasets / "tasks.json").write_text(json.dumps({"tasks": {"nb201": {"N0": {"train": ["a"], "test": ["b"]}}}}))
    monkeypatch.setenv("LATFARM_DATASETS", str(datasets))
    out = tmp_path / "out"
    out.mkdir()
    assert_error(latfarm("bench", "predictor", "--tasks", "N9", "--out", str(out)), ExitCode.INVALID,
                 "unknown task(s) N9")
    (out / "predictor.csv").write_text("not,the,columns\n")
    assert_error(latfarm("bench", "predictor", "--tasks", "N0", "--out", str(out), "--json"), ExitCode.CONFLICT,
                 "does not have the columns")


@pytest.mark.slow
def test_onboard_json_with_a_real_agent(farm: Farm, tmp_path: Path) -> None:
    device = "cli-cpu"
    with running_agent(farm.url, ADMIN_TOKEN, device, 1, tmp_path, ["--poll-wait", "1"]):
        with FarmClient(farm.url, ADMIN_TOKEN) as client:
            client.wait_for_device(device)
        result = latfarm("onboard", device, "--samples", "2", "--server", farm.url, "--token", ADMIN_TOKEN, "--json")
    assert result.exit_code == 0, (result.output, (tmp_path / "agent.log").read_text()[-3000:])
    onboarding = json.loads(result.stdout)
    assert onboarding["status"] == "ready" and onboarding["device"] == device and onboarding["predictor_id"]
    assert onboarding["jobs_total"] == onboarding_jobs(2, onboarding["rounds"])
