"""The run directory: claiming it for one config, writing its files atomically, and what a
run records of its environment (package versions, the checkout's commit)."""

from __future__ import annotations

import json
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from harness.core.errors import ConfigError
from harness.core.hashing import canonical_json, content_hash
from harness.store.logs import os_error

PACKAGES = ("torch", "transformers", "lm-eval", "peft", "numpy", "scikit-learn", "openai")


def package_versions() -> dict[str, str]:
    """The installed versions of the packages that shape a run's numbers."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str:
    """The checkout's commit (with '+dirty' for uncommitted changes), or '' outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("+dirty" if dirty else "")


def write_tables(run_dir: Path, tables: dict[str, dict[str, list[dict[str, Any]]]]
                 ) -> list[Path]:
    """Each task's tables as run_dir/tables/<task>.<table>.json and .csv; returns the paths."""
    import pandas as pd

    out_dir = run_dir / "tables"
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise os_error(e, out_dir, "create") from None
    paths = []
    for task, by_name in tables.items():
        for name, table in by_name.items():
            json_path, csv_path = (out_dir / f"{task}.{name}.{ext}" for ext in ("json", "csv"))
            write_text(json_path, json.dumps(table, indent=1) + "\n")
            frame = pd.DataFrame([{k: (json.dumps(v) if isinstance(v, dict | list) else v)
                                   for k, v in r.items()} for r in table])
            write_text(csv_path, frame.to_csv(index=False))
            paths += [json_path, csv_path]
    return paths


def write_text(path: Path, text: str) -> None:
    """Write a small file atomically, or fail with one line naming it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        raise os_error(e, path, "write") from None


def claim_run_dir(run_dir: Path, resolved: dict[str, Any]) -> None:
    """Create the run directory, or check an existing one was made by the same config."""
    config_path = run_dir / "config.json"
    text = canonical_json(resolved) + "\n"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        old = config_path.read_text(encoding="utf-8") if config_path.exists() else None
    except OSError as e:
        raise os_error(e, run_dir, "create the run directory") from None
    if old is not None and old != text:
        try:
            same = content_hash(json.loads(old)) == content_hash(resolved)
        except ValueError:
            same = False
        if not same:
            raise ConfigError(f"run directory {run_dir} holds a run with another config; pass "
                              f"another --run-id, or delete that directory")
    write_text(config_path, text)
