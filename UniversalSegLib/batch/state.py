"""The batch's state: one SQLite database in the output folder, written by the driver process only.

Per case it holds the input's fingerprint, the model's checksum and the options (so that a re-run
re-does exactly the cases whose input, model or options changed), the status (``running``, ``done``,
``failed``), timings, the error message and the quality signals. Every change is one committed
transaction, so a batch killed at any moment finds a consistent database when it is run again; a case
left ``running`` by a killed batch is simply run again (its outputs are replaced as one set).

With ``--shard K/N`` each shard writes its own database (``batch-shard-K-of-N.sqlite``): SQLite on a
shared file system must not have several writers. :func:`corpus_rows` reads all of them (the newest
record of each case wins) and :func:`merge_into` copies them into the main ``batch.sqlite``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..helpers import sha256_file

__all__ = ["BatchState", "CaseRecord", "database_name", "database_paths", "corpus_rows", "merge_into",
           "input_fingerprint", "options_digest", "shard_of", "MAIN_DATABASE"]

MAIN_DATABASE = "batch.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    case_id TEXT PRIMARY KEY,
    input TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    model_checksum TEXT NOT NULL,
    options TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    runs INTEGER NOT NULL DEFAULT 0,
    started REAL,
    finished REAL,
    seconds REAL,
    timings TEXT,
    outputs TEXT,
    signals TEXT,
    worker TEXT
);
"""
_COLUMNS = ("case_id", "input", "fingerprint", "model_checksum", "options", "status", "error", "runs", "started",
            "finished", "seconds", "timings", "outputs", "signals", "worker")
_JSON_COLUMNS = ("timings", "outputs", "signals")


def database_name(shard: tuple[int, int] | None = None) -> str:
    """``batch.sqlite``, or ``batch-shard-K-of-N.sqlite`` for shard K of N."""
    return MAIN_DATABASE if shard is None else f"batch-shard-{shard[0]}-of-{shard[1]}.sqlite"


def database_paths(folder: str | os.PathLike) -> list[Path]:
    """Every batch database in ``folder``: the main one first, then the shards'."""
    folder = Path(folder)
    shards = sorted(folder.glob("batch-shard-*-of-*.sqlite"))
    main = folder / MAIN_DATABASE
    return ([main] if main.exists() else []) + shards


def input_fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of the input's content: a file's bytes, or a DICOM folder's file names and bytes."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.exists():
        return "missing"
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode() + b"\0" + sha256_file(item).encode())
    return digest.hexdigest()


def options_digest(options: Mapping[str, Any]) -> str:
    """The options that change a case's outputs, as canonical JSON (compared between runs)."""
    return json.dumps(dict(options), sort_keys=True, separators=(",", ":"))


@dataclass
class CaseRecord:
    case_id: str
    input: str
    fingerprint: str
    model_checksum: str
    options: str
    status: str
    error: str | None = None
    runs: int = 0
    started: float | None = None
    finished: float | None = None
    seconds: float | None = None
    timings: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    signals: dict = field(default_factory=dict)
    worker: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row | tuple) -> "CaseRecord":
        values = dict(zip(_COLUMNS, row))
        for name in _JSON_COLUMNS:
            values[name] = json.loads(values[name]) if values[name] else {}
        return cls(**values)

    def matches(self, fingerprint: str, model_checksum: str, options: str) -> bool:
        return (self.fingerprint, self.model_checksum, self.options) == (fingerprint, model_checksum, options)


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(str(path), timeout=30)
    connection.execute("PRAGMA journal_mode=DELETE")  # one file per database: safe to copy, no -wal files
    connection.execute("PRAGMA synchronous=FULL")  # a committed status survives a power cut
    connection.executescript(_SCHEMA)
    return connection


class BatchState:
    """The database of one batch run (one writer: open it in the driver process only)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.connection = _connect(self.path)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> "BatchState":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get(self, case_id: str) -> CaseRecord | None:
        row = self.connection.execute(f"SELECT {', '.join(_COLUMNS)} FROM cases WHERE case_id = ?", (case_id,)).fetchone()
        return None if row is None else CaseRecord.from_row(row)

    def records(self) -> list[CaseRecord]:
        rows = self.connection.execute(f"SELECT {', '.join(_COLUMNS)} FROM cases ORDER BY case_id").fetchall()
        return [CaseRecord.from_row(row) for row in rows]

    def mark_running(self, case_id: str, input_path: str, fingerprint: str, model_checksum: str, options: str,
                     worker: str | None = None) -> None:
        with self.connection:
            self.connection.execute(
                "INSERT INTO cases (case_id, input, fingerprint, model_checksum, options, status, runs, started, worker) "
                "VALUES (?, ?, ?, ?, ?, 'running', 1, ?, ?) ON CONFLICT(case_id) DO UPDATE SET input=excluded.input, "
                "fingerprint=excluded.fingerprint, model_checksum=excluded.model_checksum, options=excluded.options, "
                "status='running', error=NULL, runs=cases.runs + 1, started=excluded.started, finished=NULL, "
                "seconds=NULL, worker=excluded.worker",
                (case_id, input_path, fingerprint, model_checksum, options, time.time(), worker))

    def mark_finished(self, case_id: str, ok: bool, error: str | None = None, seconds: float | None = None,
                      timings: Mapping | None = None, outputs: Mapping | None = None, signals: Mapping | None = None,
                      worker: str | None = None) -> None:
        with self.connection:
            self.connection.execute(
                "UPDATE cases SET status=?, error=?, finished=?, seconds=?, timings=?, outputs=?, signals=?, "
                "worker=COALESCE(?, worker) WHERE case_id=?",
                ("done" if ok else "failed", error, time.time(), seconds, json.dumps(timings or {}),
                 json.dumps(outputs or {}), json.dumps(signals or {}), worker, case_id))

    def upsert(self, record: CaseRecord) -> None:
        values = [json.dumps(getattr(record, c)) if c in _JSON_COLUMNS else getattr(record, c) for c in _COLUMNS]
        with self.connection:
            self.connection.execute(f"INSERT OR REPLACE INTO cases ({', '.join(_COLUMNS)}) VALUES "
                                    f"({', '.join('?' * len(_COLUMNS))})", values)


def _newer(a: CaseRecord, b: CaseRecord) -> bool:
    """Is ``a`` the better record of a case than ``b``: finished beats unfinished, then the newest."""
    return ((a.status != "running"), a.finished or a.started or 0.0) > ((b.status != "running"), b.finished or b.started or 0.0)


def corpus_rows(folder: str | os.PathLike) -> list[CaseRecord]:
    """The corpus view: each case's newest record over the main and all shard databases in ``folder``."""
    best: dict[str, CaseRecord] = {}
    for path in database_paths(folder):
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            rows = connection.execute(f"SELECT {', '.join(_COLUMNS)} FROM cases").fetchall()
        except sqlite3.OperationalError:
            rows = []  # a database created but never written
        finally:
            connection.close()
        for row in rows:
            record = CaseRecord.from_row(row)
            if record.case_id not in best or _newer(record, best[record.case_id]):
                best[record.case_id] = record
    return [best[k] for k in sorted(best)]


def merge_into(folder: str | os.PathLike) -> list[CaseRecord]:
    """Copy the newest record of every case from the shard databases into ``batch.sqlite``."""
    rows = corpus_rows(folder)
    with BatchState(Path(folder) / MAIN_DATABASE) as state:
        for record in rows:
            current = state.get(record.case_id)
            if current is None or _newer(record, current):
                state.upsert(record)
    return rows


def shard_of(case_id: str, count: int) -> int:
    """The shard (1..count) that takes ``case_id``: a stable hash, the same on every machine and run."""
    return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:8], "big") % count + 1
