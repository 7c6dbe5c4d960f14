"""The Once-for-all MobileNetV3 space (OFA mbv3, width 1.0): per-block kernel size and
expansion ratio, per-stage depth, and input resolution."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .base import ArchGraph, InvalidArchitecture, SearchSpace, chain_graph, one_hot, sample_distinct

if TYPE_CHECKING:
    import torch  # torch loads on first use of build(), not on import

KERNEL_SIZES = (3, 5, 7)
EXPAND_RATIOS = (3, 4, 6)
DEPTHS = (2, 3, 4)
RESOLUTIONS = tuple(range(128, 225, 4))
N_STAGES = 5
MAX_DEPTH = 4
N_BLOCKS = N_STAGES * MAX_DEPTH
#: the key's list fields and their lengths; the other field, "r", is one int
LIST_LENGTHS = {"d": N_STAGES, "e": N_BLOCKS, "ks": N_BLOCKS}
FIELDS = frozenset((*LIST_LENGTHS, "r"))
BLOCK_OPS = tuple(f"k{k}_e{e}" for k in KERNEL_SIZES for e in EXPAND_RATIOS)
INACTIVE = "skip"


class OFAArch(NamedTuple):
    """A parsed key. Block b belongs to stage b // 4 and is active when b % 4 < d[stage];
    the ks and e of inactive blocks are kept as given but do not affect the network."""

    ks: tuple[int, ...]
    e: tuple[int, ...]
    d: tuple[int, ...]
    r: int

    def is_active(self, block: int) -> bool:
        return block % MAX_DEPTH < self.d[block // MAX_DEPTH]

    def key(self) -> str:
        return json.dumps(self._asdict(), sort_keys=True, separators=(",", ":"))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true parses to an int subclass


def _no_duplicate_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise InvalidArchitecture("a field appears twice")
    return fields


def _values(record: dict[str, Any], field: str, allowed: Sequence[int]) -> tuple[int, ...]:
    values = record[field]
    length = LIST_LENGTHS[field]
    if not isinstance(values, list) or len(values) != length:
        raise InvalidArchitecture(f"{field!r} must be a list of {length} integers, got {values!r}")
    for position, value in enumerate(values):
        if not _is_int(value) or value not in allowed:
            raise InvalidArchitecture(f"{field}[{position}] must be one of {list(allowed)}, got {value!r}")
    return tuple(values)


def parse(key: str) -> OFAArch:
    """The architecture of a JSON key `{"d": [5 ints], "e": [20], "ks": [20], "r": int}`.

    Fields other than these four are rejected, so a key names exactly one network."""
    if not isinstance(key, str):
        raise InvalidArchitecture(f"an OFA key is a JSON string, not {type(key).__name__}")
    try:
        record = json.loads(key, object_pairs_hook=_no_duplicate_fields)
    except json.JSONDecodeError as exc:
        raise InvalidArchitecture(f"not JSON: {exc}") from None
    except RecursionError:  # "[[[[..." nested past the parser's stack
        raise InvalidArchitecture("not an OFA key: nested too deeply") from None
    if not isinstance(record, dict):
        raise InvalidArchitecture(f"an OFA key is a JSON object, got {type(record).__name__}")
    missing, unknown = FIELDS - record.keys(), record.keys() - FIELDS
    if missing or unknown:
        problems = [f"{what}: {', '.join(sorted(names))}"
                    for what, names in (("missing", missing), ("unknown", unknown)) if names]
        raise InvalidArchitecture(f"an OFA key has exactly the fields {', '.join(sorted(FIELDS))}; "
                                  f"{'; '.join(problems)}")
    r = record["r"]
    if not _is_int(r) or r not in RESOLUTIONS:
        raise InvalidArchitecture(f"'r' must be one of {RESOLUTIONS[0]}..{RESOLUTIONS[-1]} in steps of 4, got {r!r}")
    return OFAArch(
        ks=_values(record, "ks", KERNEL_SIZES), e=_values(record, "e", EXPAND_RATIOS),
        d=_values(record, "d", DEPTHS), r=r,
    )


def _draw(rng: np.random.Generator) -> str:
    return OFAArch(
        ks=tuple(rng.choice(KERNEL_SIZES, N_BLOCKS).tolist()),
        e=tuple(rng.choice(EXPAND_RATIOS, N_BLOCKS).tolist()),
        d=tuple(rng.choice(DEPTHS, N_STAGES).tolist()),
        r=int(rng.choice(RESOLUTIONS)),
    ).key()


class OFASpace(SearchSpace):
    """Once-for-all MobileNetV3 subnetworks with a searchable input resolution."""

    name = "ofa"
    op_names = (*BLOCK_OPS, INACTIVE, "input", "output")
    input_shape = (3, 224, 224)
    feature_dim = N_BLOCKS * (len(KERNEL_SIZES) + len(EXPAND_RATIOS)) + N_STAGES * len(DEPTHS) + 1
    onehot_dim = N_BLOCKS * (len(KERNEL_SIZES) + len(EXPAND_RATIOS))
    key_format = ('JSON of per-stage depth d (5), per-block kernel ks and expansion e (20 each) and resolution r: '
                  '{"d":[2,...],"e":[3,...],"ks":[3,...],"r":224}')
    has_reference_tables = True

    def canonical(self, key: str) -> str:
        """The compact, key-sorted JSON of `key`; inactive blocks keep their values."""
        return parse(key).key()

    def read_table_keys(self, root: Path) -> dict[int, str]:
        keys = {}
        with open(root / "ofa_archs.jsonl") as handle:
            for line in handle:
                record = json.loads(line)
                index = record.pop("ofa_idx")
                keys[int(index)] = self.canonical(json.dumps(record))
        return keys

    def network_key(self, key: str) -> str:
        """The key with every inactive block set to the smallest kernel and expansion: keys that
        differ only in inactive blocks build the same network."""
        arch = parse(key)
        active = [arch.is_active(b) for b in range(N_BLOCKS)]
        return arch._replace(
            ks=tuple(k if on else KERNEL_SIZES[0] for k, on in zip(arch.ks, active)),
            e=tuple(e if on else EXPAND_RATIOS[0] for e, on in zip(arch.e, active)),
        ).key()

    def live_key(self, key: str) -> str:
        return self.network_key(key)

    def parse(self, key: str) -> OFAArch:
        return parse(key)

    def size(self) -> int:
        """The number of distinct keys; keys differing only in inactive blocks are the same network."""
        return (len(KERNEL_SIZES) * len(EXPAND_RATIOS)) ** N_BLOCKS * len(DEPTHS) ** N_STAGES * len(RESOLUTIONS)

    def sample(self, n: int, seed: int) -> list[str]:
        return sample_distinct(_draw, n, seed, self.size())

    def input_shape_of(self, key: str) -> tuple[int, int, int]:
        r = parse(key).r
        return (3, r, r)

    def graph(self, key: str) -> ArchGraph:
        """input -> one node per block ("k5_e4", or "skip" when inactive) -> output."""
        arch = parse(key)
        ops = [
            self.op_names.index(f"k{arch.ks[b]}_e{arch.e[b]}" if arch.is_active(b) else INACTIVE)
            for b in range(N_BLOCKS)
        ]
        return chain_graph(ops, self.op_names.index("input"), self.op_names.index("output"))

    def features(self, keys: Sequence[str]) -> np.ndarray:
        """Per key: one-hot kernel size and expansion ratio per block, zero for inactive blocks
        (20 x 6), one-hot depth per stage (5 x 3) and the resolution scaled to [0, 1] (1)."""
        rows = []
        for key in keys:
            arch = parse(key)
            active = np.array([arch.is_active(b) for b in range(N_BLOCKS)], dtype=np.float32)[:, None]
            blocks = np.concatenate([
                one_hot([KERNEL_SIZES.index(k) for k in arch.ks], len(KERNEL_SIZES)),
                one_hot([EXPAND_RATIOS.index(e) for e in arch.e], len(EXPAND_RATIOS)),
            ], axis=1) * active
            depths = one_hot([DEPTHS.index(d) for d in arch.d], len(DEPTHS))
            resolution = (arch.r - RESOLUTIONS[0]) / (RESOLUTIONS[-1] - RESOLUTIONS[0])
            rows.append(np.concatenate([blocks.ravel(), depths.ravel(), [resolution]]))
        return np.asarray(rows, dtype=np.float32).reshape(len(rows), self.feature_dim)

    def build(self, key: str) -> torch.nn.Module:
        from ._ofa_net import ofa_network

        return ofa_network(parse(key)).eval()
