"""The HTTP API against a real server on a port, with the published tables imported and a base
predictor pre-trained by the server's own training worker."""

from __future__ import annotations

import time

import httpx
import pytest

from predictor.spaces import get_space
from tests.helpers import NB201_KEY, assert_json_error, pretrained, scrape


@pytest.mark.slow
def test_imported_datasets_are_listed_and_paged(imported, api: httpx.Client) -> None:
    nb201_devices = api.get("/devices", params={"space": "nb201"}).json()["items"]
    published = {d["name"] for d in nb201_devices if d["source"] == "imported"}
    assert len(published) == 40  # other tests may add devices of their own
    assert {"titan_rtx_256", "raspi4", "embedded_tpu_edge_tpu_int8"} <= published
    seen, cursor = 0, 0
    while cursor is not None:
        page = api.get("/measurements", params={"device": "titan_rtx_256", "space": "nb201", "cursor": cursor,
                                                "limit": 5000}).json()
        seen += len(page["items"])
        cursor = page["next_cursor"]
    assert seen == 15_625


@pytest.mark.slow
def test_whole_space_predict_on_an_imported_device(imported, api: httpx.Client) -> None:
    base = pretrained(api)
    published = {d["name"] for d in api.get("/devices", params={"space": "nb201"}).json()["items"] if d["source"] == "imported"}
    assert published <= set(base["training_devices"])
    started = time.perf_counter()
    response = api.post("/predict", json={"device": "titan_rtx_256", "space": "nb201", "architectures": "all"})
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["latency_ms"]) == len(body["uncertainty_ms"]) == len(set(body["architectures"])) == 15_625
    assert body["predictor_id"] == base["id"]
    assert all(ms > 0 for ms in body["latency_ms"])
    print(f"whole-space predict: {elapsed:.2f} s, {len(response.content) / 1e6:.1f} MB")
    # answers are remembered per predictor and device: a later batch (reordered, repeated) agrees
    some = [body["architectures"][i] for i in (7, 3, 7, 15_000)]
    again = api.post("/predict", json={"device": "titan_rtx_256", "space": "nb201", "architectures": some}).json()
    assert again["latency_ms"] == [body["latency_ms"][i] for i in (7, 3, 7, 15_000)]
    assert again["uncertainty_ms"] == [body["uncertainty_ms"][i] for i in (7, 3, 7, 15_000)]
    metrics = scrape(f"{api.base_url.scheme}://{api.base_url.netloc.decode()}")
    assert metrics[("latfarm_predicted_architectures_total", ())] >= 15_625
    assert metrics[("latfarm_predict_seconds_count", ())] >= 1
    # the base predictor tracks the device it was trained on
    truth = api.get("/measurements", params={"device": "titan_rtx_256", "space": "nb201", "limit": 2000}).json()
    predicted = dict(zip(body["architectures"], body["latency_ms"]))
    from scipy.stats import spearmanr

    rho = spearmanr([predicted[m["architecture"]] for m in truth["items"]], [m["latency_ms"] for m in truth["items"]])
    assert rho.statistic > 0.9
    fbnet_key = get_space("fbnet").sample(1, seed=0)[0]
    assert_json_error(api.post("/predict", json={"device": "titan_rtx_256", "space": "fbnet",
                                                 "architectures": [fbnet_key]}), 409, "device")
    # a space too large to list checks the request before any device
    assert_json_error(api.post("/predict", json={"device": "titan_rtx_256", "space": "fbnet",
                                                 "architectures": "all"}), 422, "architectures")
    assert_json_error(api.post("/predict", json={"device": "titan_rtx_256", "space": "nb201",
                                                 "architectures": [NB201_KEY, "bad"]}), 422, "architectures.1")

