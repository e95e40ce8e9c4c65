"""Append-only JSONL record logs keyed by content hash, so a killed run resumes with nothing lost.

Each record is written as one line and flushed at once, under an advisory lock, and always
starts on a fresh line. A line torn by a kill mid-write is dropped on the next open; every
complete line survives; a line that is not a valid record is reported with its file and line.
A run directory is locked while a run uses it, so a second run on it stops with one line.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness.core.errors import ConfigError, DataError
from harness.store.records import Record, RecordError, from_dict, to_dict


def os_error(e: OSError, path: Path | str, doing: str) -> DataError:
    """One line for a filesystem error: what failed, on which path, and why."""
    return DataError(f"cannot {doing} {path}: {e.strerror or type(e).__name__}")


def by_key(record: Record) -> str:
    """Index of the shared cache: one record per content key."""
    return record.key


def by_row(record: Record) -> str:
    """Index of a run's log: one record per (content key, task, variant, instruction)."""
    return "\x1f".join((record.key, record.task, record.model, record.instruction_id))


class RecordLog:
    """One JSONL file of typed records; reads tolerate a torn last line."""

    def __init__(self, path: Path, record_type: type[Record],
                 index: Callable[[Record], str] = by_key):
        self.path = Path(path)
        self.record_type = record_type
        self.index = index
        self.records: dict[str, Record] = {}
        self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            raise os_error(e, self.path, "read") from None
        good_end = 0
        for lineno, line in enumerate(data.split(b"\n"), 1):
            end = good_end + len(line) + 1
            if not line.strip():
                good_end = min(end, len(data))
                continue
            try:
                raw = json.loads(line)
            except (ValueError, RecursionError):  # not JSON, not UTF-8, a number too long
                if end > len(data):  # torn final line from a kill: drop it
                    break
                raise DataError(f"{self.path}:{lineno}: malformed record (not JSON); remove "
                                f"or fix that line") from None
            try:
                rec = from_dict(self.record_type, raw)
            except RecordError as e:
                raise DataError(f"{self.path}:{lineno}: not a valid "
                                f"{self.record_type.__name__}: {e}") from None
            self.records[self.index(rec)] = rec
            good_end = min(end, len(data))
        if good_end < len(data):
            try:
                with open(self.path, "r+b") as f:
                    f.truncate(good_end)
            except OSError as e:
                raise os_error(e, self.path, "repair") from None

    def __contains__(self, index: str) -> bool:
        return index in self.records

    def get(self, index: str) -> Record | None:
        """The record stored under an index value, if any."""
        return self.records.get(index)

    def append(self, record: Record) -> None:
        """Write one record (skipped if already stored), on a fresh line, flushed to disk."""
        index = self.index(record)
        if index in self.records:
            return
        line = (json.dumps(to_dict(record), ensure_ascii=False) + "\n").encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a+b") as f:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # concurrent writers never interleave
                try:
                    size = f.seek(0, os.SEEK_END)
                    if size:
                        f.seek(size - 1)
                        if f.read(1) != b"\n":  # a last record without its newline
                            line = b"\n" + line
                    f.write(line)
                    f.flush()
                    os.fsync(f.fileno())
                finally:
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        except OSError as e:
            raise os_error(e, self.path, "write") from None
        self.records[index] = record

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records.values())

    def __len__(self) -> int:
        return len(self.records)


class Store:
    """A run's record log backed by a content-addressed cache shared by all runs in results_dir.

    Lookups hit the run's own log, then the shared cache (relabelled for this run); new records
    go to both, so changing only the judge reuses every generation and a rerun reuses everything.
    """

    def __init__(self, results_dir: Path, run_dir: Path, kind: str, record_type: type[Record]):
        self.run = RecordLog(run_dir / f"{kind}.jsonl", record_type, by_row)
        self.cache = RecordLog(Path(results_dir) / "cache" / f"{kind}.jsonl", record_type)

    def lookup(self, key: str, labels: dict[str, Any]) -> Record | None:
        """The record for a content key under this run's labels (task, model, instruction...)."""
        row = "\x1f".join((key, labels["task"], labels["model"], labels["instruction_id"]))
        rec = self.run.get(row)
        if rec is not None:
            return rec
        rec = self.cache.get(key)
        if rec is not None:
            rec = dataclasses.replace(rec, **labels)
            self.run.append(rec)
        return rec

    def add(self, record: Record) -> None:
        """Store a freshly computed record in the cache and the run's log."""
        self.cache.append(record)
        self.run.append(record)


class RunLock:
    """An advisory lock on a run directory; a second run on it gets one line, not duplicates.

    The kernel drops the lock when its process dies, so a killed run never leaves it stale.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise os_error(e, self.path, "create") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            raise ConfigError(f"run {self.path.parent.name} is in progress in another process "
                              f"(pid {holder}); wait for it to finish, or pass another --run-id"
                              ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
