"""The dashboard (/ui) against a real farm: the NB201 reference tables imported, a base predictor
pre-trained on three of their devices, a real agent measuring real ONNX models of a held-out set,
then onboarding (sampled jobs, adaptation, validation on the held-out measurements), a job that
missed its queue deadline and one still queued. Each page is checked over plain HTTP and in
headless Chromium, which saves a screenshot of it under tests/screenshots/ (git-ignored)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from predictor import LatencyPredictor
from predictor.spaces import get_space
from server.cli.local import running_agent, running_server
from server.db import make_engine, make_session_factory, session_scope, upgrade
from server.models import Predictor
from server.services import scoring
from server.services.datasets import import_datasets
from server.settings import Settings
from server.ui.auth import COOKIE
from tests.helpers import ADMIN_TOKEN, DATASETS

SCREENSHOTS = Path(__file__).parent / "screenshots"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
AGENT_DEVICE = "ui-cpu-1t"
IDLE_DEVICE = "ui-no-agent"
REFERENCE_DEVICES = ["pixel3", "raspi4", "titan_rtx_1"]
HELD_OUT = 12
SAMPLES = 10
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout_s: float = 300, poll_s: float = 0.5,
             context: Callable[[], object] = lambda: "") -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := probe():
            return value
        time.sleep(poll_s)
    raise AssertionError(f"{what}: not within {timeout_s} s {context()}")


@dataclass(frozen=True)
class Farm:
    url: str
    base_id: int
    adapted: dict[str, Any]
    failed_job: dict[str, Any]
    queued_job: dict[str, Any]


def _finished(api: httpx.Client, ids: list[int]) -> list[dict[str, Any]] | None:
    jobs = [api.get(f"/jobs/{job_id}").json() for job_id in ids]
    return jobs if all(job["status"] in ("done", "failed", "cancelled") for job in jobs) else None


def _base_predictor(api: httpx.Client) -> int | None:
    predictors = api.get("/predictors", params={"space": "nb201"}).json()["items"]
    return next((p["id"] for p in predictors if p["kind"] == "base"), None)


def _predictor(api: httpx.Client, predictor_id: int) -> dict[str, Any]:
    return api.get(f"/predictors/{predictor_id}").json()


def _score_on_flagged(api: httpx.Client, sessions: Any, base_id: int, onboarding_id: int, predictor_id: int,
                      held_out: dict[str, float]) -> None:
    """The server scores an adaptation on the device's unflagged measurements only; on a loaded host
    too few held-out runs may pass the stability check. Then score it here the server's way on all
    of them (real measurements, real predictions) and store that, so the pages have data to draw."""
    onboarding_jobs = api.get("/jobs", params={"onboarding": onboarding_id, "limit": 1000}).json()["items"]
    samples = {job["architecture"]: job["latency_ms"] for job in onboarding_jobs if job["status"] == "done"}
    with session_scope(sessions) as session:
        base, adapted = session.get_one(Predictor, base_id), session.get_one(Predictor, predictor_id)
        scores = scoring.validate(LatencyPredictor.load(base.checkpoint), LatencyPredictor.load(adapted.checkpoint),
                                  samples, {key: ms for key, ms in held_out.items() if key not in samples})
        adapted.metrics = {**adapted.metrics, **scores}


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    if not (DATASETS / "devices.csv").is_file():
        pytest.skip("reference datasets not found")
    workdir = tmp_path_factory.mktemp("ui")
    settings = Settings(database_url=f"sqlite:///{workdir / 'latfarm.db'}", datasets=DATASETS,
                        artifact_dir=workdir / "artifacts", admin_token=ADMIN_TOKEN, poll_wait_s=1.0, heartbeat_s=1.0,
                        canary_every=5, canary_recheck_s=5.0,  # a canary trend to draw, re-checked soon
                        # this agent's canaries moved 22 % off their registration baseline on an idle
                        # host, more beside the other test worker: at the default 10 % that degrades the
                        # device, which then takes canaries only (tested in tests/live/test_farm_jobs.py),
                        # and the onboarding's jobs wait past any deadline
                        canary_drift=3.0)
    upgrade(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    with session_scope(sessions) as session:
        import_datasets(session, DATASETS, spaces=("nb201",))
    with running_server(settings) as url, \
            httpx.Client(base_url=f"{url}/api/v1", timeout=300,
                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as api:
        pretrain = api.post("/predictors/pretrain", json={"space": "nb201", "devices": REFERENCE_DEVICES})
        assert pretrain.status_code == 202, pretrain.text  # queued for the server's training worker
        base_id = wait_for("base predictor", lambda: _base_predictor(api))
        # the agent starts after training: its registration canary sets the device's baseline, and one
        # timed beside a training server made a later canary 15 % faster, which (rightly) degraded it
        with running_agent(url, ADMIN_TOKEN, AGENT_DEVICE, 1, workdir, ["--poll-wait", "1"]):
            wait_for("agent registration", lambda: api.get(f"/devices/{AGENT_DEVICE}").status_code == 200)

            # measured first, so that the onboarding's adaptation is validated on them
            held_out = get_space("nb201").sample(HELD_OUT, seed=7)
            ids = [api.post("/jobs", json={"device": AGENT_DEVICE, "space": "nb201", "architecture": key,
                                           "preset": "quick"}).json()["id"] for key in held_out]
            jobs = wait_for("held-out measurements", lambda: _finished(api, ids))
            assert sum(job["status"] == "done" for job in jobs) >= 10, jobs

            started = api.post(f"/devices/{AGENT_DEVICE}/onboard",
                               json={"space": "nb201", "samples": SAMPLES, "preset": "quick"})
            assert started.status_code == 202, started.text
            onboarding = wait_for("onboarding", lambda: (o := api.get(f"/onboardings/{started.json()['id']}").json())
                                  ["status"] in ("ready", "failed") and o,
                                  context=lambda: (api.get(f"/devices/{AGENT_DEVICE}").json(),
                                                   api.get("/jobs", params={"device": AGENT_DEVICE}).json()))
            assert onboarding["status"] == "ready", onboarding
            if "curve" not in _predictor(api, onboarding["predictor_id"])["metrics"]:
                held = {job["architecture"]: job["latency_ms"] for job in jobs if job["status"] == "done"}
                _score_on_flagged(api, sessions, base_id, onboarding["id"], onboarding["predictor_id"], held)
            adapted = _predictor(api, onboarding["predictor_id"])

            assert api.post("/devices", json={"name": IDLE_DEVICE, "hardware": "nobody serves it"}).status_code == 201
            missed = api.post("/jobs", json={"device": IDLE_DEVICE, "space": "nb201", "architecture": held_out[0],
                                             "queue_deadline_s": 1}).json()
            failed = wait_for("queue deadline", lambda: (j := api.get(f"/jobs/{missed['id']}").json())
                              ["status"] == "failed" and j, 60)
            queued = api.post("/jobs", json={"device": IDLE_DEVICE, "space": "nb201",
                                             "architecture": held_out[1]}).json()
            yield Farm(url, base_id, adapted, failed, queued)


def pages(farm: Farm) -> dict[str, tuple[str, list[str]]]:
    """name -> (path, texts the page must show)."""
    adapted = farm.adapted
    return {
        "devices": ("/ui/devices", [AGENT_DEVICE, IDLE_DEVICE, *REFERENCE_DEVICES, "Reference devices"]),
        "device-agent": (f"/ui/devices/{AGENT_DEVICE}", [AGENT_DEVICE, "Canary trend", "Measurements · nb201",
                                                         f"#{adapted['id']}"]),
        "device-reference": ("/ui/devices/pixel3", ["pixel3", "15,625", "Measurements · nb201"]),
        "jobs": ("/ui/jobs", [f"#{farm.failed_job['id']}", "queue_deadline", f"#{farm.queued_job['id']}",
                              "Recently measured"]),
        "predictors": ("/ui/predictors", [f"#{adapted['id']}", f"#{farm.base_id}", "adapted", "base"]),
        "predictor-adapted": (f"/ui/predictors/{adapted['id']}", [f"Predictor #{adapted['id']}", AGENT_DEVICE,
                                                                  "Predicted vs measured", "Rho vs samples"]),
        "predictor-base": (f"/ui/predictors/{farm.base_id}", [f"Predictor #{farm.base_id}", *REFERENCE_DEVICES,
                                                              "No validation data"]),
    }


# --------------------------------------------------------------------------- plain HTTP


@pytest.mark.slow
def test_pages_show_the_farm(farm: Farm) -> None:
    validation = farm.adapted["metrics"]["validation"]
    assert validation["n"] >= 5 and validation["points"], validation
    with httpx.Client(base_url=farm.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
        for name, (path, texts) in pages(farm).items():
            response = client.get(path)
            assert response.status_code == 200, (name, response.text)
            assert response.headers["content-type"].startswith("text/html")
            for text in texts:
                assert text in response.text, (name, text)
            assert ADMIN_TOKEN not in response.text
        scatter = client.get(f"/ui/predictors/{farm.adapted['id']}").text
        assert scatter.count('class="point"') >= len(validation["points"]) + len(farm.adapted["metrics"]["curve"])
        histogram = client.get("/ui/devices/pixel3").text
        assert histogram.count('class="bar"') >= 10
        assert client.get("/ui/devices/no-such-device").status_code == 404
        assert client.get("/ui/predictors/999999").status_code == 404
        assert client.get("/ui/predictors/abc").status_code == 404


def test_dashboard_needs_a_read_token(server_url: str, api: httpx.Client) -> None:
    with httpx.Client(base_url=server_url) as browser:
        anonymous = browser.get("/ui/jobs")
        assert anonymous.status_code == 401 and "Sign in" in anonymous.text
        assert 'name="next" value="/ui/jobs"' in anonymous.text
        assert browser.get("/ui/static/ui.css").status_code == 200  # the sign-in page is styled
        assert browser.get("/ui/static/..%2Fauth.py").status_code == 404

        predict_only = api.post("/tokens", json={"name": "ui-predict", "scopes": ["predict"]}).json()["token"]
        refused = browser.post("/ui/login", data={"token": predict_only, "next": "/ui/jobs"})
        assert refused.status_code == 403 and "read scope" in refused.text and COOKIE not in refused.headers.get(
            "set-cookie", "")
        assert browser.post("/ui/login", data={"token": "wrong"}).status_code == 401

        reader = api.post("/tokens", json={"name": "ui-read", "scopes": ["read"]}).json()["token"]
        signed_in = browser.post("/ui/login", data={"token": reader, "next": "https://elsewhere.example/"})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/ui/devices"
        cookie = signed_in.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower() and "path=/ui" in cookie.lower()
        for path in ("/ui/devices", "/ui/jobs", "/ui/predictors"):
            page = browser.get(path)  # the client keeps the cookie
            assert page.status_code == 200 and reader not in page.text, path
            assert "default-src 'self'" in page.headers["content-security-policy"]
        assert browser.post("/ui/logout").status_code == 303
        assert browser.get("/ui/devices").status_code == 401


# --------------------------------------------------------------------------- headless Chromium


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip("headless Chromium needs the Debian packages chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # no host but 127.0.0.1 resolves: the pages must work on a network without internet (a lab's)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900",
                     "--hide-scrollbars", "--force-device-scale-factor=1",
                     "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(argument)
    # every request the page makes, for `requested_hosts`
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, name: str) -> Path:
    """The whole page, beyond the window too (Chrome DevTools protocol)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
    })
    path = SCREENSHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def count(driver: Any, css: str) -> int:
    return int(driver.execute_script("return document.querySelectorAll(arguments[0]).length", css))


def requested_hosts(driver: Any) -> set[str]:
    """The hosts of the HTTP requests the browser sent since the last call (Chrome's performance
    log; data: and blob: URLs are the page's own)."""
    messages = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    urls = [httpx.URL(m["params"]["request"]["url"]) for m in messages if m["method"] == "Network.requestWillBeSent"]
    return {url.host for url in urls if url.scheme in ("http", "https")}


@pytest.mark.slow
def test_browser_renders_every_page(farm: Farm, chromium: Any) -> None:
    from selenium.webdriver.common.by import By

    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir()
    driver = chromium
    driver.get(f"{farm.url}/ui/predictors")
    assert "Sign in" in driver.title
    screenshot(driver, "login")
    driver.find_element(By.NAME, "token").send_keys(ADMIN_TOKEN)
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    # the sign-in page stands at /ui/predictors too: wait for the cookie and the page behind it, or the
    # next get races the form's redirect (which then lands on /ui/predictors instead)
    wait_for("sign-in", lambda: driver.get_cookie(COOKIE) and "Sign in" not in driver.title, 10, 0.1)
    driver.get_log("browser")  # drops the sign-in page's expected 401

    for name, (path, texts) in pages(farm).items():
        driver.get(f"{farm.url}{path}")
        body = driver.find_element(By.TAG_NAME, "body").text
        for text in texts:
            assert text in body, (name, text)
        assert ADMIN_TOKEN not in driver.page_source
        assert not [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"], name
        screenshot(driver, name)
        if name == "devices":
            assert count(driver, "#farm-devices svg.spark circle.point") >= 1  # the agent device's canary trend
            row = driver.find_element(By.XPATH, f"//tr[td//a[text()='{AGENT_DEVICE}']]").text
            # its real state: online or busy, or degraded when a noisy host moved a canary re-check
            with httpx.Client(base_url=f"{farm.url}/api/v1", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as api:
                state = api.get(f"/devices/{AGENT_DEVICE}").json()["state"]
            assert re.search(rf"\b{state}\b", row) and re.search(r"\d+ s ago", row), (state, row)
            driver.find_element(By.CSS_SELECTOR, "input.filter").send_keys("pixel")
            rows = driver.find_elements(By.CSS_SELECTOR, "table.devices tbody tr")
            visible = [r.text for r in rows if r.is_displayed()]
            assert visible and all("pixel" in text for text in visible), visible
        elif name.startswith("device-"):
            assert count(driver, "svg.chart rect.bar") >= 10
            if name == "device-agent":
                assert count(driver, "svg.chart polyline.line") == 1  # the canary trend
        elif name == "predictor-adapted":
            points = len(farm.adapted["metrics"]["validation"]["points"])
            assert count(driver, "svg.chart line.diagonal") == 1
            assert count(driver, "svg.chart circle.point") == points + len(farm.adapted["metrics"]["curve"])
            assert count(driver, "svg.chart polyline.line") == 1
    assert sorted(p.stem for p in SCREENSHOTS.glob("*.png")) == sorted(["login", *pages(farm)])


def test_api_docs_render_offline(server_url: str, chromium: Any) -> None:
    """/docs (Swagger UI) and /redoc load their scripts from the server: with no host name but
    127.0.0.1 resolving, both render every operation."""
    document = httpx.get(f"{server_url}/openapi.json").json()
    operations = {op["operationId"] for path in document["paths"].values() for op in path.values()}
    driver = chromium
    driver.get_log("performance")
    driver.get_log("browser")

    driver.get(f"{server_url}/docs")
    wait_for("Swagger UI's operations", lambda: count(driver, ".opblock") == len(operations), 30, 0.2)
    paths = {element.text for element in driver.find_elements("css selector", ".opblock-summary-path")}
    assert {"/api/v1/predict", "/api/v1/jobs/{job_id}", "/api/v1/artifacts"} <= paths
    assert requested_hosts(driver) == {"127.0.0.1"}
    assert not [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    SCREENSHOTS.mkdir(exist_ok=True)
    screenshot(driver, "api-docs")

    driver.get(f"{server_url}/redoc")
    wait_for("ReDoc's operations",
             lambda: count(driver, "[data-section-id^='operation/']") == len(operations), 30, 0.2)
    assert "Upload Artifact" in driver.find_element("tag name", "body").text
    # ReDoc's bundle always asks its CDN for the logo of its "API docs by Redocly" link, and hides
    # the image when that fails; nothing else leaves
    assert requested_hosts(driver) == {"127.0.0.1", "cdn.redoc.ly"}
    severe = [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert all("cdn.redoc.ly/redoc/logo-mini.svg" in message for message in severe), severe
