"""Import of the published reference latency tables (HELP / HW-NAS-Bench / LatBench)."""

from __future__ import annotations

import csv
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection, delete, func, select
from sqlalchemy.orm import Session

from predictor.datasets import read_latencies
from predictor.spaces import SearchSpace, reference_spaces
from server.errors import Invalid
from server.models import Architecture, Device, DeviceState, Measurement
from server.services.catalog import ensure_architectures, space_row

IMPORTED = "imported"
#: LatBench (BRP-NAS) device names start with the device class; HELP's are plain names
LATBENCH_PREFIXES = ("desktop_", "embedded_", "mobile_")
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class ImportReport:
    architectures_created: int = 0
    devices_created: int = 0
    measurements_inserted: int = 0
    devices_skipped: int = 0
    per_space: dict[str, int] = field(default_factory=dict)


def _latencies_by_device(root: Path, space: SearchSpace) -> dict[str, list[tuple[int, float]]]:
    by_device: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for index, device, ms in read_latencies(root, space):
        by_device[device].append((index, ms))
    return by_device


def _device_rows(root: Path) -> dict[str, list[dict[str, str]]]:
    rows: dict[str, list[dict[str, str]]] = defaultdict(list)
    with open(root / "devices.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            rows[row["device"]].append(row)
    return rows


def _upsert_devices(session: Session, root: Path, report: ImportReport) -> dict[str, int]:
    existing = {device.name: device for device in session.scalars(select(Device))}
    for name, rows in _device_rows(root).items():
        first = rows[0]
        batch = first["batch_size"]
        attributes = {
            "dataset": "latbench" if name.startswith(LATBENCH_PREFIXES) else "help",
            "spaces": {
                row["search_space"]: {"kind": row["kind"], "n_archs": int(row["n_archs"]), "notes": row["notes"]}
                for row in rows
            },
        }
        device = existing.get(name)
        if device is None:
            device = Device(name=name, source=IMPORTED, state=DeviceState.offline)
            session.add(device)
            existing[name] = device
            report.devices_created += 1
        device.hardware = first["hardware"]
        device.category = first["category"]
        device.batch_size = int(float(batch)) if batch else None
        device.attributes = attributes
    session.flush()
    return {name: device.id for name, device in existing.items()}


def _imported_count(session: Session, device_id: int, space_id: int) -> int:
    return session.scalar(
        select(func.count())
        .select_from(Measurement)
        .join(Architecture, Architecture.id == Measurement.architecture_id)
        .where(Measurement.device_id == device_id, Architecture.space_id == space_id, Measurement.source == IMPORTED)
    ) or 0


def _bulk_insert(connection: Connection, rows: list[tuple[int, int, float]]) -> None:
    if connection.dialect.name == "postgresql":
        import psycopg

        driver = connection.connection.driver_connection
        assert isinstance(driver, psycopg.Connection)  # make_engine's driver for PostgreSQL
        cursor = driver.cursor()
        with cursor.copy("COPY measurements (device_id, architecture_id, latency_ms, source) FROM STDIN") as copy:
            for device_id, arch_id, ms in rows:
                copy.write_row((device_id, arch_id, ms, IMPORTED))
        return
    # SQLite: the driver's own executemany; SQLAlchemy's per-row work and its NUL-character guard
    # (which these numbers cannot hold) took 3 of every 4 seconds of an NB201 import
    driver = connection.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)  # make_engine's driver for SQLite
    driver.executemany(
        "INSERT INTO measurements (device_id, architecture_id, latency_ms, source) VALUES (?, ?, ?, ?)",
        [(device_id, arch_id, ms, IMPORTED) for device_id, arch_id, ms in rows],
    )


def spaces_with_tables(names: tuple[str, ...] | None = None) -> list[SearchSpace]:
    """The installed spaces named (default: all) that have reference tables; Invalid names the others."""
    with_tables = {space.name: space for space in reference_spaces()}
    unknown = [name for name in names or () if name not in with_tables]
    if unknown:
        raise Invalid(f"{', '.join(unknown)}: no reference tables; choose from {', '.join(with_tables)}", "space")
    return list(with_tables.values()) if names is None else [with_tables[name] for name in names]


def import_datasets(
    session: Session, root: Path, spaces: tuple[str, ...] | None = None,
    progress: ProgressCallback | None = None,
) -> ImportReport:
    """Load devices, architectures and measurements of `spaces` (default: every installed space
    with reference tables); devices already complete are skipped."""
    if not (root / "devices.csv").is_file():
        raise FileNotFoundError(f"no devices.csv in {root}: point LATFARM_DATASETS at a folder of reference tables, "
                                "or unset it to use the shipped ones")
    selected = spaces_with_tables(spaces)
    report = ImportReport()
    device_ids = _upsert_devices(session, root, report)
    for space in selected:
        keys_by_index = space.read_table_keys(root)
        ids_by_key, created = ensure_architectures(
            session, space, keys_by_index.values(), {key: index for index, key in keys_by_index.items()}
        )
        report.architectures_created += created
        arch_ids = {index: ids_by_key[key] for index, key in keys_by_index.items()}
        space_id = space_row(session, space).id
        latencies = _latencies_by_device(root, space)
        inserted = 0
        for done, (device, values) in enumerate(sorted(latencies.items()), start=1):
            device_id = device_ids[device]
            if _imported_count(session, device_id, space_id) == len(values):
                report.devices_skipped += 1
            else:
                stale = select(Architecture.id).where(Architecture.space_id == space_id)
                session.execute(
                    delete(Measurement).where(
                        Measurement.device_id == device_id,
                        Measurement.source == IMPORTED,
                        Measurement.architecture_id.in_(stale),
                    )
                )
                _bulk_insert(session.connection(), [(device_id, arch_ids[i], ms) for i, ms in values])
                inserted += len(values)
            if progress is not None:
                progress(space.name, done, len(latencies))
        report.per_space[space.name] = inserted
        report.measurements_inserted += inserted
        session.commit()
    return report


def iter_reference_rows(session: Session, space: SearchSpace,
                        devices: list[str] | None = None) -> Iterator[tuple[str, str, float]]:
    """(arch key, device, ms) of the imported reference measurements of a space."""
    query = (
        select(Architecture.key, Device.name, Measurement.latency_ms)
        .join(Architecture, Architecture.id == Measurement.architecture_id)
        .join(Device, Device.id == Measurement.device_id)
        .where(Architecture.space_id == space_row(session, space).id, Measurement.source == IMPORTED)
    )
    if devices is not None:
        query = query.where(Device.name.in_(devices))
    yield from session.execute(query.execution_options(yield_per=50_000))
