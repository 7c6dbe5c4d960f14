"""Loaded predictors and their answers, kept in memory per server process."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from predictor import LatencyPredictor
from server.models import Predictor, PredictorKind, PredictorStatus

#: seconds the predictor picked for a (space, device) is reused without asking the database: a
#: new predictor of the device is served this long after it is stored at the latest
PICK_TTL_S = 1.0


@dataclass(frozen=True)
class Pick:
    """The predictor that answers for a device: what a /predict answer says of it."""

    predictor_id: int
    version: int
    kind: PredictorKind
    status: PredictorStatus
    device: str


class PredictorCache:
    """Loaded predictors by id (deserialising a checkpoint costs more than a whole-space predict),
    and their answers: a predictor is frozen once stored, so what it said of an architecture on a
    device stays true, and NAS clients ask about the same architectures again and again."""

    def __init__(self, capacity: int = 16, answers_per_device: int = 200_000, torch_threads: int = 1) -> None:
        self.capacity = capacity
        self.answers_per_device = answers_per_device
        self.torch_threads = torch_threads
        self._pinned = threading.local()
        self._items: OrderedDict[int, LatencyPredictor] = OrderedDict()
        #: (predictor id, device) -> {architecture key: (ms, uncertainty ms)}
        self._answers: OrderedDict[tuple[int, str], dict[str, tuple[float, float]]] = OrderedDict()
        #: (space, device, named predictor id) -> (monotonic expiry, pick)
        self._picks: dict[tuple[str, str, int | None], tuple[float, Pick]] = {}
        self._lock = threading.Lock()

    def get(self, row: Predictor) -> LatencyPredictor:
        return self.model(row.id, lambda: row.checkpoint)

    def model(self, predictor_id: int, checkpoint: Callable[[], bytes]) -> LatencyPredictor:
        """The loaded predictor; `checkpoint` is read only when it is not in memory yet."""
        with self._lock:
            if predictor_id in self._items:
                self._items.move_to_end(predictor_id)
                return self._items[predictor_id]
        model = LatencyPredictor.load(checkpoint())
        with self._lock:
            self._items[predictor_id] = model
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return model

    def predict(self, row: Predictor, device: str, keys: list[str]) -> tuple[list[float], list[float]]:
        """Latency and uncertainty (ms) of each key on `device`; only unseen keys reach the model."""
        return self.answer(row.id, device, keys, lambda: row.checkpoint)

    def answer(self, predictor_id: int, device: str, keys: list[str],
               checkpoint: Callable[[], bytes]) -> tuple[list[float], list[float]]:
        answers = self._answers_of(predictor_id, device)
        unseen = [key for key in dict.fromkeys(keys) if key not in answers]
        fresh: dict[str, tuple[float, float]] = {}
        if unseen:
            self.pin_torch_threads()
            ms, std = self.model(predictor_id, checkpoint).predict(unseen, device=device)
            fresh = dict(zip(unseen, zip(ms.tolist(), std.tolist())))
            self._remember(predictor_id, device, answers, fresh)
        pairs = [fresh[key] if key in fresh else answers[key] for key in keys]
        return [ms for ms, _ in pairs], [std for _, std in pairs]

    def remembered(self, pick: Pick, keys: list[str]) -> tuple[list[float], list[float]] | None:
        """The answers for `keys` if every one is already known, without touching the model."""
        with self._lock:
            answers = self._answers.get((pick.predictor_id, pick.device))
        if answers is None:
            return None
        try:
            pairs = [answers[key] for key in keys]
        except KeyError:
            return None
        return [ms for ms, _ in pairs], [std for _, std in pairs]

    def pick(self, space: str, device: str, predictor_id: int | None) -> Pick | None:
        found = self._picks.get((space, device, predictor_id))
        return found[1] if found is not None and found[0] > time.monotonic() else None

    def remember_pick(self, space: str, device: str, predictor_id: int | None, pick: Pick) -> None:
        if len(self._picks) > self.capacity * 64:  # many devices: forget them all rather than grow
            self._picks = {}
        self._picks[(space, device, predictor_id)] = (time.monotonic() + PICK_TTL_S, pick)

    def pin_torch_threads(self) -> None:
        """Set torch's thread count in the calling thread: OpenMP keeps it per thread, so the count
        set at start-up does not reach request or worker threads. Unpinned, the server's NB201
        pre-training on a busy 2-core host was 91 % done after 10 minutes; pinned, it took 79 s."""
        if getattr(self._pinned, "threads", None) != self.torch_threads:
            torch.set_num_threads(self.torch_threads)
            self._pinned.threads = self.torch_threads

    def _answers_of(self, predictor_id: int, device: str) -> dict[str, tuple[float, float]]:
        with self._lock:
            answers = self._answers.setdefault((predictor_id, device), {})
            self._answers.move_to_end((predictor_id, device))
            while len(self._answers) > self.capacity * 4:
                self._answers.popitem(last=False)
            return answers

    def _remember(self, predictor_id: int, device: str, answers: dict[str, tuple[float, float]],
                  fresh: dict[str, tuple[float, float]]) -> None:
        """Add `fresh` to `answers`, or start over from it when that would pass the cap (a new dict:
        concurrent readers keep the one they hold)."""
        if len(answers) + len(fresh) <= self.answers_per_device:
            answers.update(fresh)
            return
        with self._lock:
            self._answers[(predictor_id, device)] = dict(fresh)
