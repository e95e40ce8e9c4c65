"""Content hashes: every record is keyed by the sha256 of what produced it."""

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    """Serialise deterministically (sorted keys, no whitespace) so equal content hashes equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def content_hash(obj: Any, length: int = 16) -> str:
    """Short sha256 hex digest of an object's canonical JSON."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Full sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
