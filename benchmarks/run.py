"""`make bench`: run every stage benchmark and write docs/benchmarks.md.

Each `benchmarks/bench_<name>.py` exposes `run(workdir: Path) -> str`, a Markdown section that
measures its stage against the bare baseline in the same run. `python -m benchmarks.run ingest score`
runs only those; the sections not run keep their last text in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
ORDER = ("ingest", "preprocess", "train", "score", "serve", "duplicates", "monitor", "memory", "cluster")
HEADER = """# Benchmarks

Produced by `make bench` (`python -m benchmarks.run [NAME...]`), each stage side by side with its
bare baseline in the same run, on the project's reference machine: 2 cores, 24 GiB, no GPU, shared
and noisy. Figures are medians of repeated runs; compare the ratios, not the absolute numbers.
"""


def sections(text: str) -> dict[str, str]:
    """Existing sections of the document by name (`<!-- bench:NAME -->` markers)."""
    found = re.findall(r"<!-- bench:(\w+) -->\n(.*?)<!-- /bench:\1 -->", text, flags=re.S)
    return dict(found)


def main(names: list[str]) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    available = [n for n in ORDER if (ROOT / "benchmarks" / f"bench_{n}.py").exists()]
    chosen = names or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {available}", file=sys.stderr)
        return 2
    done = sections(DOC.read_text()) if DOC.exists() else {}
    workdir = ROOT / "benchmarks" / "out"
    for name in chosen:
        print(f"== benchmark {name}", file=sys.stderr)
        started = time.monotonic()
        module = importlib.import_module(f"benchmarks.bench_{name}")
        body = module.run(workdir / name)
        stamp = (f"\n_Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit {commit()} on "
                 f"{os.cpu_count()} cores, Python {platform.python_version()}, "
                 f"{time.monotonic() - started:.0f} s._\n")
        done[name] = body.strip() + "\n" + stamp
        write(done)
    return 0


def commit() -> str:
    """The commit measured, `+dirty` when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if dirty else "")


def write(done: dict[str, str]) -> None:
    parts = [HEADER]
    for name in [n for n in ORDER if n in done]:
        parts.append(f"<!-- bench:{name} -->\n{done[name]}<!-- /bench:{name} -->\n")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(parts))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
