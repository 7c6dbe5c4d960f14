"""The predictor's Python API on a synthetic reference table with known structure."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from predictor import LatencyPredictor, TrainConfig, get_sampler, get_space
from predictor.adaptation import prior_design
from predictor.cost import analytic_cost, summary_features
from predictor.metrics import spearman
from predictor.reference import LatencyTable
from predictor.samplers import DESIGN_POOL, FALLBACK_SAMPLER, SAMPLERS, DefaultSampler, sampler_for
from predictor.spaces import SearchSpace
from predictor.validation import held_out_devices

TINY = TrainConfig(members=2, hidden=64, depth=2, epochs=20, sampler_folds=3)
TINY_UNVALIDATED = TrainConfig(members=1, hidden=64, depth=2, epochs=20, sampler_folds=0)
SPACE = get_space("nb201")


def synthetic_ms(keys: list[str], op_cost: np.ndarray, overhead: float) -> np.ndarray:
    """A device whose latency is an overhead plus a cost per live operation and per MAC."""
    macs, _ = analytic_cost(SPACE, keys)
    counts = np.asarray([np.bincount(SPACE.op_vec(k), minlength=5) for k in keys], dtype=np.float64)
    return overhead + counts @ op_cost + macs / 5e7


#: the reference fixture: keys, and (key, device, ms) rows of six synthetic reference devices
Reference = tuple[list[str], list[tuple[str, str, float]]]


@pytest.fixture(scope="module")
def reference() -> Reference:
    keys = SPACE.sample(1500, seed=1)
    rng = np.random.default_rng(0)
    rows = []
    for d in range(6):
        ms = synthetic_ms(keys, rng.uniform(0.0, 1.0, 5), overhead=rng.uniform(1, 3))
        rows += [(key, f"ref{d}", float(value)) for key, value in zip(keys, ms)]
    return keys, rows


@pytest.fixture(scope="module")
def base(reference: Reference) -> LatencyPredictor:
    torch.manual_seed(0)
    return LatencyPredictor.pretrain(SPACE, reference[1], config=TINY)


def test_pretrained_predictor_tracks_its_reference_devices(base: LatencyPredictor, reference: Reference) -> None:
    keys, rows = reference
    truth = [ms for key, device, ms in rows if device == "ref0"]
    predicted, std = base.predict(keys, device="ref0")
    assert spearmanr(predicted, truth).statistic > 0.8
    assert np.all(std >= 0) and np.all(np.isfinite(predicted))
    with pytest.raises(ValueError, match="reference device"):
        base.predict(keys[:3], device="not-a-reference")


def test_adaptation_learns_a_new_device_from_few_samples(base: LatencyPredictor) -> None:
    held_out = SPACE.sample(400, seed=7)
    new_cost = np.array([0.0, 0.05, 0.9, 0.2, 1.5])  # unlike any reference device
    samples = SPACE.sample(20, seed=3)
    measured = dict(zip(samples, synthetic_ms(samples, new_cost, overhead=0.5)))
    device = base.adapt(measured, name="new")
    predicted, std = device.predict(held_out)
    truth = synthetic_ms(held_out, new_cost, overhead=0.5)
    # 0.892 with the Bayesian adaptation (its settings were chosen on real held-out reference
    # devices, where it ranks better than the ridge it replaced, which scored 0.90 here)
    assert spearmanr(predicted, truth).statistic > 0.88
    assert np.all(std > 0)
    # per network: samples of keys that build one network are one measurement
    assert device.target is not None and len(device.target.samples) == len({SPACE.network_key(k) for k in measured})
    assert set(device.target.samples) == {SPACE.network_key(k) for k in measured}


def test_adaptation_rejects_too_few_or_invalid_samples(base: LatencyPredictor) -> None:
    key = SPACE.sample(1, seed=0)[0]
    with pytest.raises(ValueError, match="at least 2"):
        base.adapt({key: 1.0})
    other = SPACE.sample(2, seed=5)
    with pytest.raises(ValueError, match="positive finite"):
        base.adapt({other[0]: 1.0, other[1]: float("nan")})


def test_checkpoint_round_trip_with_weights_only(base: LatencyPredictor) -> None:
    samples = SPACE.sample(12, seed=2)
    device = base.adapt(dict(zip(samples, np.linspace(1, 3, 12))), name="dev")
    buffer = io.BytesIO()
    device.save(buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)  # no pickled code
    assert state["format"].startswith("latfarm.predictor/")
    loaded = LatencyPredictor.load(buffer.getvalue())
    keys = SPACE.sample(50, seed=9)
    np.testing.assert_allclose(loaded.predict(keys)[0], device.predict(keys)[0], rtol=1e-5)
    assert loaded.target is not None and loaded.target.name == "dev"
    with pytest.raises(ValueError, match="not a latfarm predictor"):
        bad = io.BytesIO()
        torch.save({"format": "something else"}, bad)
        LatencyPredictor.load(bad.getvalue())


@pytest.mark.parametrize("name", [*sorted(SAMPLERS), "default"])
def test_samplers_are_deterministic_distinct_and_valid(name: str, base: LatencyPredictor) -> None:
    sampler = get_sampler(name)
    # the design sampler's seed draws its pool, so the candidates' networks must outnumber it
    candidates = SPACE.sample(2 * DESIGN_POOL if name in ("design", "default") else 600, seed=4)
    first = sampler.select(SPACE, 20, seed=11, predictor=base, candidates=candidates)
    again = sampler.select(SPACE, 20, seed=11, predictor=base, candidates=candidates)
    other = sampler.select(SPACE, 20, seed=12, predictor=base, candidates=candidates)
    assert first == again
    assert first != other
    assert len(set(first)) == 20 and set(first) <= set(candidates)
    with pytest.raises(ValueError, match="k must be"):
        sampler.select(SPACE, len(candidates) + 1, seed=0, predictor=base, candidates=candidates)
    if name == "design":  # more picks than its pool holds: the pool grows to k
        assert len(set(sampler.select(SPACE, DESIGN_POOL + 5, seed=0, predictor=base, candidates=candidates))) == \
            DESIGN_POOL + 5


def test_default_sampler_is_known() -> None:
    default = get_sampler("default")
    assert isinstance(default, DefaultSampler) and default.resolve(20) in SAMPLERS  # no predictor: the fallback
    with pytest.raises(ValueError, match="unknown sampler"):
        get_sampler("nope")


def test_pretraining_chooses_the_default_sampler_on_held_out_reference_devices(
    reference: Reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys, rows = reference
    few = set(keys[:400])
    rows = [row for row in rows if row[1] != "ref5" and row[0] in few]  # ref5: a device never seen
    fitted: list[set[str]] = []
    original = LatencyPredictor.fit

    def recording_fit(cls: type[LatencyPredictor], space: SearchSpace, table: LatencyTable,
                      **kwargs: Any) -> LatencyPredictor:
        fitted.append(set(table.devices))
        return original(space, table, **kwargs)

    monkeypatch.setattr(LatencyPredictor, "fit", classmethod(recording_fit))
    config = TrainConfig(members=1, hidden=32, depth=2, epochs=8, sampler_folds=3)
    first = LatencyPredictor.pretrain(SPACE, rows, config=config, seed=3)
    references = {f"ref{d}" for d in range(5)}
    held_out = held_out_devices(sorted(references), 3, seed=3)
    assert fitted[0] == references  # the base, then one fold per held-out reference device
    assert fitted[1:] == [references - {device} for device in held_out]
    assert set(first.preferred_samplers) == {5, 10, 20}
    assert set(first.preferred_samplers.values()) <= set(SAMPLERS)
    assert all(0 < rho <= 1 for per_k in first.sampler_scores.values() for rho in per_k.values())
    again = LatencyPredictor.pretrain(SPACE, rows, config=config, seed=3)
    assert again.preferred_samplers == first.preferred_samplers
    assert again.sampler_scores == first.sampler_scores
    # without folds (or with a single reference device) no choice is made
    single = [row for row in rows if row[1] == "ref0"]
    assert LatencyPredictor.pretrain(SPACE, single, config=config).preferred_samplers == {}
    unvalidated = TrainConfig(members=1, epochs=2, sampler_folds=0)
    assert LatencyPredictor.pretrain(SPACE, rows, config=unvalidated).sampler_scores == {}


def test_default_sampler_follows_the_checkpointed_preference(base: LatencyPredictor) -> None:
    candidates = SPACE.sample(600, seed=4)
    for choice in ("random", "stratified"):
        chosen = LatencyPredictor.load(base.to_bytes())  # a copy: the fixture is shared
        chosen.preferred_samplers = {5: "stratified" if choice == "random" else "random", 20: choice}
        loaded = LatencyPredictor.load(chosen.to_bytes())
        assert loaded.preferred_samplers == chosen.preferred_samplers
        assert loaded.sampler_scores == base.sampler_scores
        picked = get_sampler("default").select(SPACE, 16, seed=2, predictor=loaded, candidates=candidates)
        assert picked == get_sampler(choice).select(SPACE, 16, seed=2, predictor=loaded, candidates=candidates)
        adapted = loaded.adapt(dict(zip(picked, np.linspace(1, 2, 16))))
        assert adapted.preferred_samplers == chosen.preferred_samplers  # carried to adapted predictors


def test_sampler_for_takes_the_nearest_validated_count() -> None:
    preferred = {5: "a", 10: "b", 20: "c"}
    assert [sampler_for(preferred, k) for k in (2, 5, 7, 8, 10, 14, 15, 20, 100)] == list("aaabbbccc")
    assert sampler_for({}, 20) is None
    assert held_out_devices(["x"], 5, 0) == [] and held_out_devices(list("abc"), 0, 0) == []
    assert held_out_devices(list("abc"), 5, 0) == list("abc")
    picked = held_out_devices(list("abcdefgh"), 3, 1)
    assert len(picked) == 3 and picked == held_out_devices(list("abcdefgh"), 3, 1)


def test_spearman_matches_scipy_with_ties() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, 200).astype(float), rng.normal(size=200)
    b[:50] = np.round(b[:50])
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))


def _format3_state(predictor: LatencyPredictor, bootstrap: np.ndarray | None = None) -> dict:
    """A checkpoint as format 3 wrote it: no measured table, no prior, bootstrap target fits."""
    ensemble = predictor.ensemble
    n_design = len(predictor.reference_devices) + len(predictor.descriptor_mean)
    target = None
    if bootstrap is not None:
        target = {"name": "old", "coef": torch.from_numpy(bootstrap[:, 1:]),
                  "intercept": torch.from_numpy(bootstrap[:, 0]), "penalties": [0.0, 1.0, 10.0], "samples": {"k": 1.0}}
        assert bootstrap.shape[1] == 1 + n_design
    return {
        "format": "latfarm.predictor/3", "space": predictor.space.name,
        "reference_devices": predictor.reference_devices, "config": dict(predictor.config.__dict__),
        "feature_mean": torch.from_numpy(ensemble.feature_mean), "feature_std": torch.from_numpy(ensemble.feature_std),
        "log_mean": torch.from_numpy(np.asarray(ensemble.log_mean, dtype=np.float32)),
        "log_std": torch.from_numpy(np.asarray(ensemble.log_std, dtype=np.float32)),
        "descriptor_mean": torch.from_numpy(predictor.descriptor_mean),
        "descriptor_std": torch.from_numpy(predictor.descriptor_std),
        "members": [member.state_dict() for member in ensemble.members], "target": target,
        "preferred_samplers": {20: "random"}, "sampler_scores": {},
    }


def _saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_older_checkpoints_load_without_a_preference(base: LatencyPredictor) -> None:
    state = _format3_state(base)
    state["format"] = "latfarm.predictor/2"
    del state["preferred_samplers"], state["sampler_scores"]
    del state["config"]["sampler_folds"]
    loaded = LatencyPredictor.load(_saved(state))
    assert loaded.preferred_samplers == {} and loaded.sampler_scores == {}
    assert DefaultSampler().resolve(20, loaded) == FALLBACK_SAMPLER
    assert loaded.measured is None  # the networks answer for every reference latency
    keys = SPACE.sample(30, seed=8)
    assert loaded.prediction(keys, device="ref0").measured_share.max() == 0
    adapted = loaded.adapt(dict(zip(keys, synthetic_ms(keys, np.array([0, 0.1, 0.5, 0.8, 0.2]), 1.0))))
    assert np.all(np.isfinite(adapted.predict(keys)[0]))


def test_an_older_adapted_checkpoint_answers_with_its_bootstrap_fits(base: LatencyPredictor) -> None:
    n_design = len(base.reference_devices) + len(base.descriptor_mean)
    fits = np.random.default_rng(0).normal(0, 0.01, (64, 1 + n_design))
    fits[:, 0] += 1.0  # an intercept of 1: about e ms everywhere
    loaded = LatencyPredictor.load(_saved(_format3_state(base, fits)))
    assert loaded.target is not None and loaded.target.name == "old"
    ms, std = loaded.predict(SPACE.sample(20, seed=3))
    design = loaded.design(SPACE.sample(20, seed=3), per_network=False)[0]
    assert ms == pytest.approx(np.exp(fits.mean(axis=0)[0] + design @ fits.mean(axis=0)[1:]))
    assert np.all(std > 0)
    with pytest.raises(ValueError, match="not a latfarm predictor checkpoint"):
        LatencyPredictor.load(_saved({"format": "latfarm.predictor/1"}))


def test_a_format4_checkpoint_loads_and_answers_as_before(base: LatencyPredictor) -> None:
    """Format 4 kept the measured table (its keys as a list) but not the network each key builds:
    loading works that out again, and the answers are the same."""
    samples = SPACE.sample(12, seed=2)
    device = base.adapt(dict(zip(samples, np.linspace(1, 3, 12))), name="dev")
    state = torch.load(io.BytesIO(device.to_bytes()), weights_only=True)
    assert state["format"] == "latfarm.predictor/5"
    measured = state["measured"]
    state["format"] = "latfarm.predictor/4"
    state["measured"] = {"keys": measured["keys"].split("\n"), "devices": measured["devices"],
                         "log_ms": measured["log_ms"]}
    loaded = LatencyPredictor.load(_saved(state))
    keys = list(SPACE.enumerate())
    np.testing.assert_allclose(loaded.predict(keys)[0], device.predict(keys)[0], rtol=1e-6)
    assert loaded.reference is not None and device.reference is not None
    assert loaded.reference.network_keys == device.reference.network_keys


def test_a_predictor_saved_with_every_summary_column_keeps_regressing_on_them(base: LatencyPredictor) -> None:
    """NB201 predictors saved before its descriptors were cut to `summary_dim` hold one mean and
    std per column of the whole summary tail (live op shares and the connected flag too): loaded,
    their designs keep those columns, so an adapted device answers with the coefficients it was
    fitted with."""
    table_keys = SPACE.sample(500, seed=4)
    every_column = SPACE.feature_dim - SPACE.onehot_dim + 2  # and log MACs, log parameters
    wide = summary_features(SPACE, table_keys, SPACE.features(table_keys), width=every_column)
    assert wide.shape[1] > len(base.descriptor_mean)
    state = torch.load(io.BytesIO(base.to_bytes()), weights_only=True)
    state["descriptor_mean"], state["descriptor_std"] = map(torch.from_numpy, (wide.mean(axis=0), wide.std(axis=0)))
    old = LatencyPredictor.load(_saved(state))
    keys = SPACE.sample(40, seed=9)
    assert old.design(keys, per_network=True)[0].shape[1] == len(old.reference_devices) + wide.shape[1]
    device = old.adapt(dict(zip(keys[:15], synthetic_ms(keys[:15], np.array([0, 0.1, 0.5, 0.8, 0.2]), 1.0))))
    assert device.target is not None and len(device.target.coef) == 1 + len(old.reference_devices) + wide.shape[1]
    again = LatencyPredictor.load(device.to_bytes())
    np.testing.assert_allclose(again.predict(keys)[0], device.predict(keys)[0], rtol=1e-6)


def test_a_fit_saved_before_the_noise_was_shaped_keeps_one_noise(base: LatencyPredictor) -> None:
    """The shaped noise survives a round trip; a format-5 fit without it (saved by an earlier
    version) answers the same latencies with one noise for every architecture."""
    samples = SPACE.sample(12, seed=4)
    device = base.adapt(dict(zip(samples, np.linspace(1, 3, 12))), name="dev")
    keys = SPACE.sample(300, seed=5)
    ms, std = device.predict(keys)
    np.testing.assert_allclose(LatencyPredictor.load(device.to_bytes()).predict(keys)[1], std, rtol=1e-6)
    state = torch.load(io.BytesIO(device.to_bytes()), weights_only=True)
    del state["target"]["similarity"], state["target"]["noise_scale"]
    older = LatencyPredictor.load(_saved(state))
    assert older.target is not None and older.target.similarity is None
    older_ms, older_std = older.predict(keys)
    np.testing.assert_allclose(older_ms, ms, rtol=1e-6)
    design = older.design([SPACE.network_key(key) for key in keys], per_network=True)[0]
    z = np.hstack([np.ones((len(keys), 1)), design])
    flat = np.sqrt(((z @ older.target.cov) * z).sum(axis=1) + older.target.noise)
    np.testing.assert_allclose(older_std, older_ms * flat, rtol=1e-5)
    assert not np.allclose(older_std, std, rtol=1e-3)


def test_a_prior_saved_with_one_unexplained_share_gives_it_to_every_reference(base: LatencyPredictor) -> None:
    """Checkpoints kept one share of unexplained variance for all reference devices; they load
    with that share for each, and adapt as before."""
    state = torch.load(io.BytesIO(base.to_bytes()), weights_only=True)
    each = state["prior"]["unexplained"].numpy()
    assert each.shape == (len(base.reference_devices),)
    state["prior"]["unexplained"] = float(each.mean())
    older = LatencyPredictor.load(_saved(state))
    np.testing.assert_allclose(older.prior.unexplained_each, np.full(len(each), each.mean()), rtol=1e-6)
    samples = dict(zip(SPACE.sample(12, seed=6), np.linspace(1, 3, 12)))
    keys = SPACE.sample(200, seed=7)
    np.testing.assert_allclose(older.adapt(samples).predict(keys)[0], base.adapt(samples).predict(keys)[0], rtol=1e-6)


def test_reference_devices_answer_with_their_measurements(base: LatencyPredictor, reference: Reference) -> None:
    keys, rows = reference
    truth = {key: ms for key, device, ms in rows if device == "ref1"}
    prediction = base.prediction(keys[:50], device="ref1")
    assert prediction.ms == pytest.approx([truth[key] for key in keys[:50]], rel=1e-5)
    assert np.all(prediction.std == 0) and np.all(prediction.measured_share == 1)
    timed_networks = {SPACE.network_key(key) for key in truth}
    unseen = [key for key in SPACE.sample(3000, seed=11) if SPACE.network_key(key) not in timed_networks][:20]
    outside = base.prediction(unseen, device="ref1")
    assert np.all(outside.measured_share == 0) and np.all(outside.std >= 0)
    # ref1 does not charge for dead code (keys holding it cost what their network costs, within
    # noise), so it ran the built network: what it timed of a network answers for the network's
    # other keys
    assert base.reference is not None and not base.reference.charges[base.reference_devices.index("ref1")]
    twins = [key for key in SPACE.sample(3000, seed=11)
             if key not in truth and SPACE.network_key(key) in timed_networks][:20]
    answered = base.prediction(twins, device="ref1")
    assert len(twins) == 20 and np.all(answered.measured_share == 1) and np.all(answered.std == 0)
    network_ms = [np.exp(np.mean([np.log(ms) for key, ms in truth.items()
                                  if SPACE.network_key(key) == SPACE.network_key(twin)])) for twin in twins]
    assert answered.ms == pytest.approx(network_ms, rel=1e-5)
    adapted = base.adapt({key: truth[key] for key in keys[:10]}, per_network=False)
    assert np.all(adapted.prediction(keys[10:60]).measured_share == 1)
    assert np.all(adapted.prediction(unseen).measured_share == 0)


def test_one_network_gets_one_latency_on_a_farm_device(base: LatencyPredictor) -> None:
    """Every key of the NB201 space: keys that build the same network (dead edges, relabelled
    intermediate nodes) get one prediction on a device measured through the farm's exports,
    and a sample of each network counts once."""
    keys = list(SPACE.enumerate())
    samples = SPACE.sample(20, seed=5)
    measured = dict(zip(samples, synthetic_ms(samples, np.array([0, 0.1, 0.6, 0.9, 0.3]), 0.8)))
    device = base.adapt(measured)
    assert device.target is not None and device.target.per_network
    ms, std = device.predict(keys)
    by_network: dict[str, set[tuple[float, float]]] = {}
    for key, value, spread in zip(keys, ms, std):
        by_network.setdefault(SPACE.network_key(key), set()).add((float(value), float(spread)))
    assert len(by_network) == 8765
    assert all(len(answers) == 1 for answers in by_network.values())
    assert len({answer for answers in by_network.values() for answer in answers}) > 8000  # not one constant
    # the same network measured under another key is the same measurement: it counts once
    dead = next(key for key in keys if SPACE.is_connected(key) and SPACE.live_key(key) != key)
    measured[dead] = 2.5
    device = base.adapt(measured)
    doubled = base.adapt({**measured, SPACE.live_key(dead): 2.5})
    assert doubled.predict(keys[:500])[0] == pytest.approx(device.predict(keys[:500])[0])
    assert doubled.target is not None and device.target is not None
    assert len(doubled.target.samples) == len(device.target.samples)


#: connected NB201 keys, some with dead code, whose dead-code-free twins the charging base's table holds too
TWINS = [key for key in SPACE.sample(800, seed=21) if SPACE.is_connected(key)]


@pytest.fixture(scope="module")
def charging_base() -> LatencyPredictor:
    """Pre-trained on reference devices that charge for dead operations (they count every op as
    written, and their table holds each key's dead-code-free twin, so the charge shows)."""
    keys = list(dict.fromkeys(TWINS + [SPACE.live_key(key) for key in TWINS]))
    rng = np.random.default_rng(1)
    rows = [(key, f"ref{d}", float(ms)) for d in range(4)
            for key, ms in zip(keys, synthetic_ms(keys, np.r_[0.0, rng.uniform(1.0, 3.0, 4)], 1.0))]
    torch.manual_seed(0)
    return LatencyPredictor.pretrain(SPACE, rows, config=TINY_UNVALIDATED)


def test_the_samples_tell_whether_a_device_that_timed_keys_as_written_charged_for_dead_code(
        charging_base: LatencyPredictor) -> None:
    """`adapt(per_network=None)`: a device timed as the charging references were is read as
    written; one that ran only the built networks is read per network, so the keys building one
    network share its latency."""
    cost = np.array([0.0, 0.5, 1.8, 2.7, 0.9])
    networks: dict[str, str] = {}
    for key in SPACE.sample(3000, seed=11):  # distinct networks, half of them with dead code
        if SPACE.is_connected(key) and (SPACE.live_key(key) != key) == (len(networks) % 2 == 0):
            networks.setdefault(SPACE.network_key(key), key)
    samples = list(networks.values())[:20]
    as_written = dict(zip(samples, synthetic_ms(samples, cost, 0.8)))
    built = dict(zip(samples, synthetic_ms([SPACE.live_key(key) for key in samples], cost, 0.8)))
    charging = charging_base.adapt(as_written, per_network=None)
    running_networks = charging_base.adapt(built, per_network=None)
    assert charging.target is not None and not charging.target.per_network
    assert running_networks.target is not None and running_networks.target.per_network
    dead = next(key for key in TWINS if SPACE.live_key(key) != key)
    answers = running_networks.predict([dead, SPACE.live_key(dead)])[0]
    assert answers[0] == answers[1]
    # told how the device timed, the predictor takes it at its word
    told = charging_base.adapt(built, per_network=False).target
    assert told is not None and not told.per_network


def test_a_device_its_samples_leave_in_doubt_is_predicted_by_both_readings(charging_base: LatencyPredictor) -> None:
    """Samples of networks without dead code cannot tell whether the device charged for it: its
    prediction is the two readings' mixture by their probability (the mean of log-latency, and
    a variance that holds the readings' disagreement), and a checkpoint keeps it."""
    live = [key for key in TWINS if SPACE.live_key(key) == key]
    samples = dict(zip(live[:8], synthetic_ms(live[:8], np.array([0.0, 0.5, 1.8, 2.7, 0.9]), 0.8)))
    device = charging_base.adapt(samples, per_network=None)
    target = device.target
    assert target is not None and target.other_reading is not None
    assert target.other_reading.per_network != target.per_network
    weight = target.other_reading_probability
    assert 1e-3 <= weight <= 0.5
    dead = [key for key in TWINS if SPACE.live_key(key) != key]
    likelier = charging_base.adapt(samples, per_network=target.per_network).prediction(dead)
    other = charging_base.adapt(samples, per_network=not target.per_network).prediction(dead)
    mixture = device.prediction(dead)
    assert np.log(mixture.ms) == pytest.approx((1 - weight) * np.log(likelier.ms) + weight * np.log(other.ms))
    readings_variance = (1 - weight) * (likelier.std / likelier.ms) ** 2 + weight * (other.std / other.ms) ** 2
    disagreement = np.abs(np.log(likelier.ms / other.ms)) > 0.05
    assert disagreement.any()
    assert np.all((mixture.std / mixture.ms)[disagreement] ** 2 > readings_variance[disagreement])
    reloaded = LatencyPredictor.load(device.to_bytes()).prediction(dead)
    assert reloaded.ms == pytest.approx(mixture.ms) and reloaded.std == pytest.approx(mixture.std)


def test_active_learning_picks_unmeasured_networks_that_cut_the_uncertainty_most(base: LatencyPredictor) -> None:
    """`most_informative` picks networks no sample measured, one key each, and leaves the posterior
    less unsure over the space than the five most uncertain networks or five random ones would."""
    keys = list(SPACE.enumerate())
    samples = SPACE.sample(10, seed=6)
    measured = dict(zip(samples, synthetic_ms(samples, np.array([0, 0.2, 0.7, 1.1, 0.3]), 0.6)))
    device = base.adapt(measured)
    assert device.target is not None
    picks = device.most_informative(keys, 5)
    networks = [SPACE.network_key(key) for key in picks]
    assert len(set(networks)) == 5 and not set(networks) & set(device.target.samples)
    assert device.most_informative(samples, 5) == []  # every one of them measured already

    pool = [network for network in dict.fromkeys(map(SPACE.network_key, keys)) if network not in device.target.samples]
    design = device.design(pool, per_network=True)[0]
    z = np.hstack([np.ones((len(pool), 1)), design])

    def variance_left(chosen: list[str]) -> float:
        """Summed posterior variance over the pool once `chosen` are measured (information form)."""
        picked = [pool.index(SPACE.network_key(key)) for key in chosen]
        rows = z[picked]
        assert device.target is not None
        noise = device.target.noise_of(design[picked])
        cov = np.linalg.inv(np.linalg.inv(device.target.cov) + rows.T @ (rows / noise[:, None]))
        return float(((z @ cov) * z).sum())

    ms, std = device.predict(pool)
    most_uncertain = [pool[i] for i in np.argsort(-std / ms)[:5]]
    random_picks = [pool[i] for i in np.random.default_rng(0).choice(len(pool), 5, replace=False)]
    assert variance_left(picks) < variance_left(most_uncertain)
    assert variance_left(picks) < variance_left(random_picks)


def test_design_sampler_picks_what_cuts_a_new_devices_uncertainty_most(base: LatencyPredictor) -> None:
    """The design sampler's picks (a base predictor's `most_informative`, before any sample)
    leave less of the prior's uncertainty over its pool than the stratified sampler's or random
    picks of the same count do."""
    pool = list(dict.fromkeys(map(SPACE.network_key, SPACE.sample(1500, seed=9))))  # under DESIGN_POOL
    z, cov, noise = prior_design(base.prior, base.design(pool, per_network=True)[0], len(base.reference_devices))

    def variance_left(chosen: list[str]) -> float:
        """Summed variance over the pool once `chosen` are measured (information form)."""
        rows = z[[pool.index(SPACE.network_key(key)) for key in chosen]]
        left = np.linalg.inv(np.linalg.pinv(cov) + rows.T @ (rows / noise[0]))
        return float(((z @ left) * z).sum())

    designed = get_sampler("design").select(SPACE, 8, seed=0, predictor=base, candidates=pool)
    assert designed == base.most_informative(pool, 8)
    for other in ("stratified", "random"):
        for seed in range(3):
            picks = get_sampler(other).select(SPACE, 8, seed=seed, predictor=base, candidates=pool)
            assert variance_left(designed) < variance_left(picks)


@pytest.mark.parametrize("name", ["random", "stratified", "kmeans", "design", "default"])
def test_samplers_never_spend_two_samples_on_one_network(base: LatencyPredictor, name: str) -> None:
    keys = list(SPACE.enumerate())
    k = 30 if name == "kmeans" else 200
    candidates = keys if name != "kmeans" else keys[::5]
    picked = get_sampler(name).select(SPACE, k, seed=1, predictor=base, candidates=candidates)
    assert len(picked) == k
    assert len({SPACE.network_key(key) for key in picked}) == k


def test_served_answers_are_the_models_for_seen_and_unseen_keys(base: LatencyPredictor) -> None:
    from server.models import Predictor
    from server.services.answer_cache import PredictorCache

    cache = PredictorCache(answers_per_device=3)  # a tiny cap: the second call starts over
    row = Predictor(id=1, checkpoint=base.to_bytes())
    device = base.reference_devices[0]
    keys = get_space("nb201").sample(4, seed=5)
    cache.predict(row, device, keys[:2])
    batch = [keys[1], keys[2], keys[0], keys[2], keys[3]]
    ms, std = cache.predict(row, device, batch)
    truth_ms, truth_std = base.predict(batch, device=device)  # float32: a batch's make-up moves the last digits
    assert ms == pytest.approx(truth_ms.tolist(), rel=1e-4) and std == pytest.approx(truth_std.tolist(), rel=1e-4)
    assert ms[1] == ms[3] and ms[0] == cache.predict(row, device, [keys[1]])[0][0]


def test_metrics_agree_with_their_definitions() -> None:
    from scipy.stats import kendalltau

    from predictor import metrics

    truth = np.array([1.0, 2.0, 4.0, 8.0, 10.0])
    predicted = np.array([1.05, 2.5, 3.9, 8.0, 12.0])
    assert metrics.kendall(predicted, truth) == pytest.approx(kendalltau(predicted, truth).statistic)
    assert metrics.mape(predicted, truth) == pytest.approx(np.mean([5, 25, 2.5, 0, 20]))
    assert metrics.within(predicted, truth) == pytest.approx(3 / 5)
    # a log-std of 0.1: a 90 % interval of +-16.4 % in log terms
    assert metrics.coverage(predicted, 0.1 * predicted, truth) == pytest.approx(3 / 5)
    assert np.isnan(metrics.kendall(np.ones(5), truth))
