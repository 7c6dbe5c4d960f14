#!/usr/bin/env python
"""Latency-constrained evolutionary NAS over NAS-Bench-201, with the farm as the latency oracle.

Regularized (aging) evolution (Real et al., 2019) with Pareto-rank tournaments: each generation
mutates one edge operation of tournament winners, scores all new children in one batched
`POST /api/v1/predict` call on the chosen device (latency and its uncertainty), and drops the
oldest members. Candidates whose predicted latency (plus `--confidence` times its uncertainty) is
over `--budget-ms` lose every tournament to those within it. The result is the Pareto set of
(accuracy proxy up, predicted latency down) over every feasible architecture scored. With
`--verify` (the default) that set is then measured for real on the device through the job API
and predicted latency is compared with measured latency.

The accuracy objective is a *proxy*, never an accuracy: the reference datasets hold latencies
only. `--proxy params` (default) is the exact parameter count of the NB201 CIFAR network the farm
builds (only edges on a path from cell input to output are built), computed here in closed form;
parameter count is the usual training-free baseline of the zero-cost-proxy literature.
`--proxy synflow` is SynFlow (Tanaka et al., 2020), log10 of the data-free saliency sum; it builds
each network with PyTorch and therefore needs torch and latfarm's `predictor` package.

Needs only the farm's client (`pip install 'latfarm[client]'`: httpx, pydantic; rich for the
tables) and a client token with the `read`, `predict` and `submit` scopes:

    python examples/latency_constrained_search.py --server http://farm:8000 --token T \\
        --device rpi4-ort-1t-b1 --budget-ms 5 --generations 20 --population 32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from latfarm import FarmClient, FarmError, Job
from latfarm.models import Preset

SPACE = "nb201"
#: NB201 operations (ids are positions) and the cell's edges (source, target) in arch-string order
OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
EDGES = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))
OUTPUT_NODE = 3
Ops = tuple[int, ...]


# --- the NB201 cell, in a few lines ---------------------------------------------------------------

def arch_key(ops: Ops) -> str:
    """The canonical NB201 arch string, e.g. `|nor_conv_3x3~0|+|none~0|skip_connect~1|+|...|`."""
    return "+".join(
        "|" + "|".join(f"{OPS[op]}~{source}" for op, (source, t) in zip(ops, EDGES) if t == target) + "|"
        for target in range(1, OUTPUT_NODE + 1)
    )


def parse_key(key: str) -> Ops:
    ops = []
    for node in key.split("+"):
        for edge in node.strip("|").split("|"):
            ops.append(OPS.index(edge.partition("~")[0]))
    if len(ops) != len(EDGES) or arch_key(tuple(ops)) != key:
        raise ValueError(f"not a canonical NB201 arch string: {key!r}")
    return tuple(ops)


def live_edges(ops: Ops) -> tuple[bool, ...]:
    """Per edge: whether it lies on a path of non-`none` edges from cell input to output."""
    from_input, to_output = {0}, {OUTPUT_NODE}
    for (source, target), op in zip(EDGES, ops):
        if op and source in from_input:
            from_input.add(target)
    for (source, target), op in reversed(list(zip(EDGES, ops))):
        if op and target in to_output:
            to_output.add(source)
    return tuple(bool(op) and s in from_input and t in to_output for (s, t), op in zip(EDGES, ops))


def random_arch(rng: random.Random) -> Ops:
    while True:
        ops = tuple(rng.randrange(len(OPS)) for _ in EDGES)
        if any(live_edges(ops)):  # a cell with no input-to-output path computes nothing
            return ops


def mutate(ops: Ops, rng: random.Random) -> Ops:
    """Change the operation of one edge; retry until the cell stays connected."""
    while True:
        edge = rng.randrange(len(EDGES))
        child = list(ops)
        child[edge] = rng.choice([op for op in range(len(OPS)) if op != ops[edge]])
        if any(live_edges(tuple(child))):
            return tuple(child)


# --- accuracy proxies -----------------------------------------------------------------------------

STEM, STAGE_CHANNELS, CELLS_PER_STAGE, CLASSES = 16, (16, 32, 64), 5, 10


def conv_bn_params(c_in: int, c_out: int, kernel: int) -> int:
    return c_in * c_out * kernel * kernel + 2 * c_out  # bias-free conv + batch norm (weight, bias)


def param_count(ops: Ops) -> int:
    """Parameters of the NB201 CIFAR-10 network (stem, 3 stages of 5 cells, 2 residual reductions,
    head) with only live edges built: what the farm exports and measures."""
    fixed = conv_bn_params(3, STEM, 3) + 2 * STAGE_CHANNELS[-1] + STAGE_CHANNELS[-1] * CLASSES + CLASSES
    for c_in, c_out in zip(STAGE_CHANNELS, STAGE_CHANNELS[1:]):
        fixed += conv_bn_params(c_in, c_out, 3) + conv_bn_params(c_out, c_out, 3) + c_in * c_out
    kernel = {OPS.index("nor_conv_1x1"): 1, OPS.index("nor_conv_3x3"): 3}
    cells = sum(
        CELLS_PER_STAGE * conv_bn_params(c, c, kernel[op])
        for c in STAGE_CHANNELS for op, live in zip(ops, live_edges(ops)) if live and op in kernel
    )
    return fixed + cells


def synflow_score(ops: Ops) -> float:
    """log10 SynFlow: sum |w * dR/dw| of the linearised network (|w|, all-ones input, float64)."""
    import torch

    from predictor.spaces import get_space

    net = get_space(SPACE).build(arch_key(ops)).double().eval()  # eval: fresh BN is the identity
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.abs_()
    net.zero_grad()
    torch.sum(net(torch.ones(1, 3, 32, 32, dtype=torch.float64))).backward()
    with torch.no_grad():
        total = sum(float((p.grad * p).abs().sum()) for p in net.parameters() if p.grad is not None)
    return math.log10(total) if total > 0 else 0.0


PROXIES: dict[str, tuple[Callable[[Ops], float], str]] = {
    "params": (lambda ops: param_count(ops) / 1e6, "params (M)"),
    "synflow": (synflow_score, "log10 synflow"),
}


# --- the search -----------------------------------------------------------------------------------

@dataclass
class Candidate:
    ops: Ops
    proxy: float
    ms: float
    unc: float

    @property
    def key(self) -> str:
        return arch_key(self.ops)


@dataclass
class Oracle:
    """Batched, cached `/predict` calls on one predictor, counted."""

    farm: FarmClient
    device: str
    requests: int = 0
    scored: int = 0
    seconds: float = 0.0
    cache: dict[Ops, tuple[float, float]] = field(default_factory=dict)
    predictor: dict[str, Any] = field(default_factory=dict)

    def score(self, batch: Sequence[Ops]) -> None:
        new = list(dict.fromkeys(ops for ops in batch if ops not in self.cache))
        if not new:
            return
        started = time.perf_counter()
        # the first answer names the predictor; later calls pin it, so that one search sees one
        # predictor even if the server re-adapts the device's meanwhile
        answer = self.farm.predict(self.device, SPACE, [arch_key(ops) for ops in new], self.predictor.get("id"))
        self.seconds += time.perf_counter() - started
        self.requests += 1
        self.scored += len(new)
        self.predictor = {"id": answer.predictor_id, "version": answer.predictor_version, "kind": answer.predictor_kind}
        for ops, key, ms, unc in zip(new, answer.architectures, answer.latency_ms, answer.uncertainty_ms):
            assert key == arch_key(ops), (key, arch_key(ops))
            self.cache[ops] = (float(ms), float(unc))


def dominates(a: Candidate, b: Candidate) -> bool:
    return a.proxy >= b.proxy and a.ms <= b.ms and (a.proxy > b.proxy or a.ms < b.ms)


def pareto_ranks(members: Sequence[Candidate]) -> list[int]:
    """Non-domination rank (0 = Pareto front) of each member, as in NSGA-II."""
    ranks, remaining, rank = [0] * len(members), set(range(len(members))), 0
    while remaining:
        front = {i for i in remaining if not any(dominates(members[j], members[i]) for j in remaining if j != i)}
        for i in front:
            ranks[i] = rank
        remaining -= front
        rank += 1
    return ranks


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    front = [c for c in candidates if not any(dominates(o, c) for o in candidates)]
    return sorted({c.ops: c for c in front}.values(), key=lambda c: c.ms)


def search(oracle: Oracle, proxy: Callable[[Ops], float], args: argparse.Namespace,
           log: Callable[[str], None]) -> dict[Ops, Candidate]:
    rng = random.Random(args.seed)
    proxies: dict[Ops, float] = {}
    seen: dict[Ops, Candidate] = {}

    def candidates(batch: Sequence[Ops]) -> list[Candidate]:
        oracle.score(batch)  # one /predict call for the whole batch
        out = []
        for ops in batch:
            if ops not in proxies:
                proxies[ops] = proxy(ops)
            ms, unc = oracle.cache[ops]
            seen[ops] = Candidate(ops, proxies[ops], ms, unc)
            out.append(seen[ops])
        return out

    def violation(c: Candidate) -> float:
        return max(0.0, c.ms + args.confidence * c.unc - args.budget_ms)

    population = candidates([random_arch(rng) for _ in range(args.population)])  # oldest first
    for generation in range(1, args.generations + 1):
        ranks = pareto_ranks(population)
        # constraint domination (Deb): feasible beats infeasible, then Pareto rank, then the proxy
        fitness = {id(c): (violation(c), rank, -c.proxy) for c, rank in zip(population, ranks)}
        parents = [min(rng.sample(population, args.tournament), key=lambda c: fitness[id(c)])
                   for _ in range(args.children)]
        population += candidates([mutate(parent.ops, rng) for parent in parents])
        population = population[-args.population:]  # aging: the oldest die
        feasible = [c for c in seen.values() if violation(c) == 0]
        best = max(feasible, key=lambda c: c.proxy, default=None)
        log(f"generation {generation}/{args.generations}: {len(seen)} architectures scored, "
            f"{len(feasible)} within budget" + (f", best proxy {best.proxy:.4g} at {best.ms:.3f} ms" if best else ""))
    return seen


# --- verification ---------------------------------------------------------------------------------

def spread(front: Sequence[Candidate], n: int) -> list[Candidate]:
    """At most n members, evenly spaced along the front (its ends included)."""
    if n <= 0 or len(front) <= n:
        return list(front)
    if n == 1:
        return [front[-1]]
    return [front[round(i * (len(front) - 1) / (n - 1))] for i in range(n)]


def measure(farm: FarmClient, device: str, keys: Sequence[str], preset: Preset, deadline_s: float,
            log: Callable[[str], None]) -> list[Job]:
    jobs = farm.submit(device, SPACE, keys, preset, queue_deadline_s=deadline_s)
    log(f"submitted {len(jobs)} measurement jobs to {device} ({preset} preset); waiting for the agent")
    return farm.wait_for_jobs(jobs)


def ranks_of(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 3:
        return None
    rx, ry = ranks_of(x), ranks_of(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    return cov / var if var else None


# --- the command ----------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--server", default=os.environ.get("LATFARM_SERVER", "http://127.0.0.1:8000"),
                        help="the farm's base URL (or LATFARM_SERVER)")
    parser.add_argument("--token", default=os.environ.get("LATFARM_TOKEN"),
                        help="client token with read, predict and submit scopes (or LATFARM_TOKEN)")
    parser.add_argument("--device", required=True, help="target device; it must be served by /predict")
    parser.add_argument("--budget-ms", type=float, required=True, help="latency budget on the device")
    parser.add_argument("--confidence", type=float, default=1.0,
                        help="feasible when predicted ms + confidence * uncertainty <= budget")
    parser.add_argument("--proxy", choices=sorted(PROXIES), default="params", help="accuracy proxy to maximise")
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--children", type=int, default=0,
                        help="children per generation, scored in one /predict call; 0: population / 4")
    parser.add_argument("--tournament", type=int, default=8, help="tournament size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the final Pareto set on the device through the farm")
    parser.add_argument("--verify-max", type=int, default=20,
                        help="measure at most this many Pareto members, spread along the front (0: all)")
    parser.add_argument("--preset", choices=["quick", "standard", "rigorous"], default="standard",
                        help="measurement protocol of the verification jobs")
    parser.add_argument("--queue-deadline-s", type=float, default=3600.0,
                        help="verification jobs not started by then fail")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of tables")
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("give --token (or set LATFARM_TOKEN)")
    args.children = args.children or max(1, args.population // 4)
    for name in ("generations", "population", "children", "tournament"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    args.tournament = min(args.tournament, args.population)
    if args.budget_ms <= 0:
        parser.error("--budget-ms must be positive")
    return args


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    proxy, proxy_label = PROXIES[args.proxy]
    with FarmClient(args.server, args.token) as farm:
        if args.verify and not farm.device(args.device).agents:
            raise FarmError(f"no agent serves device {args.device!r}, so the Pareto set cannot be measured; "
                            "start one (latfarm-agent) or pass --no-verify")
        oracle = Oracle(farm, args.device)
        started = time.perf_counter()
        seen = search(oracle, proxy, args, log)
        search_s = time.perf_counter() - started
        feasible = [c for c in seen.values() if c.ms + args.confidence * c.unc <= args.budget_ms]
        front = pareto_front(feasible)
        predictor = farm.predictor(oracle.predictor["id"]) if oracle.predictor else None

        jobs: dict[str, Job] = {}
        if args.verify and front:
            chosen = spread(front, args.verify_max)
            measured_jobs = measure(farm, args.device, [c.key for c in chosen], args.preset, args.queue_deadline_s, log)
            jobs = {c.key: job for c, job in zip(chosen, measured_jobs)}

    rows: list[dict[str, Any]] = []
    for c in front:
        job = jobs.get(c.key)
        measured = job.latency_ms if job and job.status == "done" else None
        rows.append({
            "arch": c.key, "proxy": c.proxy, "predicted_ms": c.ms, "uncertainty_ms": c.unc,
            "verified": job is not None, "job_id": job.id if job else None,
            "job_status": job.status if job else None, "reused_measurement": job.reused if job else None,
            "flags": job.flags if job else None, "measured_ms": measured,
            "meets_budget_measured": None if measured is None else measured <= args.budget_ms,
        })
    verified = [r for r in rows if r["measured_ms"] is not None]
    predicted_ms, measured_ms = [r["predicted_ms"] for r in verified], [r["measured_ms"] for r in verified]
    best = max(front, key=lambda c: c.proxy, default=None)
    return {
        "device": args.device, "space": SPACE, "budget_ms": args.budget_ms, "confidence": args.confidence,
        "proxy": args.proxy, "proxy_label": proxy_label, "seed": args.seed, "verify": args.verify,
        "generations": args.generations, "population": args.population, "children": args.children,
        "predictor": {**oracle.predictor,
                      "device_measurements": predictor.metrics.get("samples") if predictor else None},
        "predictor_calls": {"http_requests": oracle.requests, "architectures_scored": oracle.scored,
                            "seconds": round(oracle.seconds, 3)},
        "search": {"seconds": round(search_s, 3), "architectures_visited": len(seen), "feasible": len(feasible),
                   "best": None if best is None else {"arch": best.key, "proxy": best.proxy, "predicted_ms": best.ms}},
        "measurements": {
            "jobs_submitted": len(jobs),
            "done": sum(j.status == "done" for j in jobs.values()),
            "failed": sum(j.status != "done" for j in jobs.values()),
            "reused": sum(j.reused for j in jobs.values()),
        },
        "pareto_size": len(front),
        "pareto": rows,
        "verification": {
            "verified": len(verified),
            "meet_budget_measured": sum(r["meets_budget_measured"] for r in verified),
            "spearman_rho": spearman(predicted_ms, measured_ms),
            "mape_pct": (100 * sum(abs(p - m) / m for p, m in zip(predicted_ms, measured_ms)) / len(verified)
                         if verified else None),
        },
    }


def report(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"Pareto set on {summary['device']} (budget {summary['budget_ms']} ms, "
                        f"{summary['pareto_size']} architectures)")
    for column in ("ops", summary["proxy_label"], "predicted ms", "measured ms", "meets budget"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in summary["pareto"]:
        measured = ("-" if not row["verified"] else f"{row['measured_ms']:.3f}" if row["measured_ms"] is not None
                    else row["job_status"])
        meets = {None: "-", True: "yes", False: "[red]no[/]"}[row["meets_budget_measured"]]
        table.add_row("".join(str(op) for op in parse_key(row["arch"])), f"{row['proxy']:.4g}",
                      f"{row['predicted_ms']:.3f} ± {row['uncertainty_ms']:.3f}", measured, meets)
    console.print(table)
    console.print("ops: the operation of each edge (1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2), as in nb201_archs.csv: "
                  + ", ".join(f"{i} {op}" for i, op in enumerate(OPS)) + "; --json gives the arch strings")
    calls, jobs, check = summary["predictor_calls"], summary["measurements"], summary["verification"]
    predictor = summary["predictor"]
    console.print(f"predictor {predictor.get('id')} ({predictor.get('kind')}, v{predictor.get('version')}"
                  + (f", adapted from {predictor['device_measurements']} measurements of this device"
                     if predictor.get("device_measurements") is not None else "") + ")")
    console.print(f"predictor calls: {calls['http_requests']} /predict requests scoring "
                  f"{calls['architectures_scored']} architectures in {calls['seconds']:.2f} s")
    if not summary["verify"]:
        console.print("real measurements: none (--no-verify)")
    else:
        console.print(f"real measurements: {jobs['jobs_submitted']} jobs submitted for verification, {jobs['done']} "
                      f"done ({jobs['reused']} reused earlier measurements), {jobs['failed']} failed")
    if check["verified"]:
        rho = "n/a (fewer than 3 points)" if check["spearman_rho"] is None else f"{check['spearman_rho']:.3f}"
        console.print(f"measured within budget: {check['meet_budget_measured']} of {check['verified']} verified; "
                      f"Spearman rho predicted vs measured: {rho}; MAPE {check['mape_pct']:.1f}%")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        summary = run(args, log)
    except FarmError as exc:
        log(f"error: {exc}")
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
