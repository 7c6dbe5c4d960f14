"""What more than one test module uses: constants, waiting, a pre-trained base predictor, error
and metrics checks, tiny models. (Fixtures are in conftest.py; no test module imports another.)"""

from __future__ import annotations

import io
import os
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import onnx
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families

from predictor.datasets import find_datasets

REPO = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = os.environ.get("LATFARM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DATASETS = find_datasets()
ADMIN_TOKEN = "test-admin-token"
NB201_KEY = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
#: an agent's capability report, for tests that speak the agent protocol themselves
CAPABILITIES = {"hostname": "h", "cpu_model": "c", "cpu_cores": 1, "memory_bytes": 1, "os": "linux",
                "python": "3", "agent_version": "0"}


def wait_until(predicate, timeout_s: float = 120, poll_s: float = 0.3):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def pretrained(api: httpx.Client, space: str = "nb201") -> dict[str, Any]:
    """The newest base predictor of `space`; pre-trains one through the API (and the server's
    training worker) when there is none."""
    bases = [p for p in api.get("/predictors", params={"space": space}).json()["items"] if p["kind"] == "base"]
    if bases:
        return bases[-1]
    task = api.post("/predictors/pretrain", json={"space": space})
    assert task.status_code == 202, task.text
    done = wait_until(lambda: (t := api.get(f"/tasks/{task.json()['id']}").json())["status"] in ("done", "failed") and t,
                      900, 1.0)
    assert done["status"] == "done", done
    return api.get(f"/predictors/{done['predictor_id']}").json()


def registered(api: httpx.Client, device: str):  # type: ignore[no-untyped-def]
    response = api.get(f"/devices/{device}")
    return response.status_code == 200 and response.json()["agents"] and response.json()


def scrape(farm_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics, fetched without a token, as {(sample name, labels): value}."""
    reply = httpx.get(f"{farm_url}/metrics")
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(reply.text) for sample in family.samples}


def assert_json_error(response: httpx.Response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    if field is not None:
        assert field in body["field"], body
    return body


def tiny_onnx() -> bytes:
    node = helper.make_node("Relu", ["input"], ["output"])
    graph = helper.make_graph(
        [node], "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def small_cnn(width: int, depth: int, resolution: int, seed: int) -> bytes:
    """A plain CNN of its own (not from any space), random weights, as ONNX bytes."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU()]
    for _ in range(depth):
        layers += [nn.Conv2d(width, width, 3, padding=1, groups=1), nn.BatchNorm2d(width), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    model = nn.Sequential(*layers).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 3, resolution, resolution),), buffer, dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["output"])
    return buffer.getvalue()


def unparsable_model() -> bytes:
    """A valid ONNX model whose middle node is an op of an unknown domain: no shape for its output."""
    graph = helper.make_graph(
        [helper.make_node("Mystery", ["input"], ["hidden"], name="mystery_node", domain="com.example"),
         helper.make_node("Relu", ["hidden"], ["output"], name="relu")],
        "unparsable", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["n", "c", "h", "w"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.checker.check_model(model)
    return model.SerializeToString()
