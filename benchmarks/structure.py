"""Print the package's shape: lines per package, imports inside functions, and `harness list`'s
wall time and peak memory (the figures issue 26's closing note compares before and after).

    python benchmarks/structure.py [REPO_ROOT]
"""

import ast
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


def lines_per_package(pkg: Path) -> Counter:
    """Non-blank source lines per top-level package of harness (flat modules count as '.')."""
    out: Counter = Counter()
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg)
        where = rel.parts[0] if len(rel.parts) > 1 else "."
        out[where] += sum(1 for line in path.read_text().splitlines() if line.strip())
    return out


def inner_imports(pkg: Path) -> tuple[int, int]:
    """(all, internal) import statements inside functions, counted per imported module."""
    total = internal = 0
    for path in pkg.rglob("*.py"):
        tree = ast.parse(path.read_text())
        seen: set[int] = set()
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if id(node) in seen or not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                seen.add(id(node))
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    names = ["." * node.level + (node.module or "")]
                total += len(names)
                internal += sum(1 for n in names if n.startswith(("harness", ".")))
    return total, internal


def time_list(root: Path, repeats: int = 5) -> tuple[float, float]:
    """Median wall seconds and peak RSS (MiB) of `python -m harness list`, run `repeats` times."""
    walls, peaks = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run([sys.executable, "-m", "harness", "list"], cwd=root, check=True,
                       capture_output=True)
        walls.append(time.perf_counter() - start)
        peaks.append(max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
    walls.sort()
    return walls[len(walls) // 2], max(peaks) / 1024


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent)
    pkg = root / "harness"
    counts = lines_per_package(pkg)
    print(f"non-blank lines: {sum(counts.values())}")
    for name, n in sorted(counts.items()):
        print(f"  {name:10s} {n:6d}")
    total, internal = inner_imports(pkg)
    print(f"imports inside functions (per imported module): {total} ({internal} of harness's own)")
    wall, peak = time_list(root)
    print(f"harness list: {wall:.2f} s median wall, {peak:.0f} MiB peak RSS")


if __name__ == "__main__":
    main()
