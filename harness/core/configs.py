"""Where configs come from: the built-in ones, and a user's project folder that adds to them.

The built-in registry (models.toml), tasks/, judges/ and the report template sit at the top of
the checkout and ship inside the wheel as harness/builtin/. A user's project folder (the working
directory, or `--project DIR`, or $HARNESS_PROJECT) may hold its own models.toml, tasks/ and
judges/: its variants, tasks and judges add to the built-in ones, and a name defined in both
means the project's.
"""

import json
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

from harness import PROJECT_ROOT
from harness.core.errors import ConfigError, DataError, HarnessError, unknown_name

#: Environment variable naming the project folder (set by --project; default: the working dir).
PROJECT_ENV = "HARNESS_PROJECT"
#: A name that becomes one file or folder name (a run id, a task or a variant name): a letter
#: or digit, then letters, digits and . _ + @ = - (no separator, no leading dot, no "..").
_PATH_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@=-]{0,199}")


def path_component(value: str, what: str, reserved: tuple[str, ...] = ()) -> str:
    """value if it is safe as one file or folder name (so no name steers a write outside the
    results folder); one ConfigError line otherwise."""
    if not isinstance(value, str) or not _PATH_COMPONENT.fullmatch(value) or ".." in value:
        raise ConfigError(f"{what} {value!r} cannot be a file name: use letters, digits and "
                          f". _ + @ = - (starting with a letter or digit, no '..', at most 200)")
    if value.lower() in reserved:  # case-insensitive file systems: "Cache" is "cache"
        raise ConfigError(f"{what} {value!r} is reserved (results/{value} is the harness's own)")
    return value


def builtin_dir() -> Path:
    """The built-in configs: harness/builtin/ in an installed wheel, else the checkout's root."""
    packaged = Path(__file__).resolve().parents[1] / "builtin"
    return packaged if (packaged / "models.toml").is_file() else PROJECT_ROOT


def project_dir() -> Path:
    """The user's project folder: $HARNESS_PROJECT, else the working directory."""
    return Path(os.environ.get(PROJECT_ENV) or Path.cwd())


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def config_dirs(kind: str) -> list[Path]:
    """Folders searched for `kind` ("tasks" or "judges"), the project's first."""
    builtin, project = builtin_dir() / kind, project_dir() / kind
    dirs = [project] if project.is_dir() and not _same(project, builtin) else []
    return dirs + [builtin]


def registry_files() -> list[Path]:
    """The registry layers in order: built-in models.toml, then the project's, if it has one."""
    builtin, project = builtin_dir() / "models.toml", project_dir() / "models.toml"
    extra = [project] if project.is_file() and not _same(project, builtin) else []
    return [builtin, *extra]


def report_template() -> Path:
    """The report's Jinja template (results/report.html.j2)."""
    return builtin_dir() / "results" / "report.html.j2"


def available(kind: str) -> list[str]:
    """Names of the configs of a kind (file stems of *.toml) across the project and built-ins."""
    return sorted({p.stem for d in config_dirs(kind) for p in d.glob("*.toml")})


def read_user_text(path: Path, what: str, error: type[HarnessError] = ConfigError) -> str:
    """A file a user wrote, as text: only a regular file (a FIFO or a device would block the
    read forever), UTF-8 with or without a byte-order mark; one clear error otherwise."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path} is not a regular file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}") from None


def read_json(path: Path, what: str) -> Any:
    """A JSON file's value, or one DataError (missing, unreadable, malformed, a number too long
    for Python to read, or nested too deeply)."""
    text = read_user_text(path, what, DataError)
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(f"cannot read {what} {path}: nested too deeply") from None
    except ValueError as e:  # malformed, or an integer past Python's digit limit
        raise DataError(f"cannot read {what} {path}: {e}") from None


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's tables, or one clear ConfigError (missing, unreadable, malformed)."""
    text = read_user_text(path, what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path}: {e}") from None
    except RecursionError:
        raise ConfigError(f"{what} {path}: nested too deeply") from None


def find_named(kind: str, name_or_path: str) -> Path:
    """The file for a config name (project first, then built-in) or a path to a .toml."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" and path.is_file():
        return path
    for folder in config_dirs(kind):
        candidate = folder / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    if path.suffix == ".toml":
        raise ConfigError(f"{kind[:-1]} config not found: {path}")
    raise unknown_name(kind[:-1], name_or_path, available(kind))


def load_named_toml(kind: str, name_or_path: str) -> tuple[Path, dict[str, Any]]:
    """Read a task or judge config by name or path; unknown names suggest the nearest ones."""
    path = find_named(kind, name_or_path)
    return path, read_toml(path, f"{kind[:-1]} config")


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               list: "a list", dict: "a table"}


def expect(value: Any, types: type | tuple[type, ...], where: str, what: str) -> Any:
    """Check a value a user wrote in TOML has the right type (bool is never a number)."""
    types = types if isinstance(types, tuple) else (types,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        names = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
        raise ConfigError(f"{where}: {what} must be {names}, got {value!r}")
    return value
