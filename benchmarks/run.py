"""`make bench`: run every stage benchmark and write docs/benchmarks.md.

Each `benchmarks/bench_<name>.py` exposes `run(workdir: Path) -> str`, a Markdown section that
measures its stage against the bare baseline in the same run; each section runs in a child process of
its own. `python -m benchmarks.run ingest score` runs only those; the sections not run keep their last
text in docs/benchmarks.md, marked stale when the code they measured differs from the code
fingerprint stamped on them: their bench module and every module of this checkout it imports,
directly or through others (the whole CLI where it runs the `imageiq` command), so a change to one
stage leaves the other stages' sections standing.
"""

from __future__ import annotations

import ast
import hashlib
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
ORDER = ("ingest", "preprocess", "train", "score", "serve", "duplicates", "monitor", "memory", "cluster",
         "sizing", "commands", "fixed_cost")
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
        started, load_before = time.monotonic(), os.getloadavg()[0]
        body = run_section(name, workdir)
        stamp = (f"\n_Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit {commit(name)} on "
                 f"{os.cpu_count()} cores, Python {platform.python_version()}, "
                 f"code {code_fingerprint(name)}, {time.monotonic() - started:.0f} s, "
                 f"load average {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end._\n")
        done[name] = body.strip() + "\n" + stamp
        write(done)
    for name in set(done) - set(chosen):
        done[name] = mark_staleness(name, done[name])
    write(done)
    return 0


def run_section(name: str, workdir: Path) -> str:
    """One section's Markdown, measured in a child process of its own: a section's Spark session,
    models and arrays end with it, so the next section starts on a clean machine (in one shared
    process, score's leftovers once got preprocess OOM-killed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    result = workdir / f"{name}.md"
    result.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "benchmarks.run", SECTION_FLAG, name, str(result)], cwd=ROOT,
                   check=True)
    return result.read_text()


def measure_section(name: str, result: Path) -> None:
    """The child's side of `run_section`."""
    module = importlib.import_module(f"benchmarks.bench_{name}")
    result.write_text(module.run(result.parent / name))


SECTION_FLAG = "--section"
STALE = "**Stale:** "


PACKAGE = "imageiq_spark"


def module_file(module: str) -> Path | None:
    """The file of one of this checkout's modules (`imageiq_spark.*`, `benchmarks.*`), else None."""
    parts = module.split(".")
    if parts[0] not in (PACKAGE, "benchmarks"):
        return None
    path = ROOT.joinpath(*parts)
    return next((f for f in (path.with_suffix(".py"), path / "__init__.py") if f.is_file()), None)


def runs_cli(node: ast.AST) -> bool:
    """`python -m imageiq_spark ...` or the `imageiq` script (`BIN / "imageiq"`) in a command line."""
    if isinstance(node, ast.Constant):
        return node.value == PACKAGE
    return (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
            and isinstance(node.right, ast.Constant) and node.right.value == "imageiq")


def names_a_module(node: ast.AST) -> bool:
    """An f-string naming one of the package's modules at run time (`f"imageiq_spark.stages.{stage}"`)."""
    return (isinstance(node, ast.JoinedStr) and bool(node.values) and isinstance(node.values[0], ast.Constant)
            and str(node.values[0].value).startswith(f"{PACKAGE}."))


def imported_files(path: Path) -> set[Path]:
    """This checkout's modules that a file imports anywhere (lazy imports in functions too); the
    whole package when it runs the CLI in a subprocess (the CLI imports each stage by its name) or
    imports a module whose name it makes at run time."""
    modules: set[str] = set()
    files: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif runs_cli(node) or names_a_module(node):
            files.update((ROOT / PACKAGE).rglob("*.py"))
    return files | {f for f in map(module_file, modules) if f is not None}


def measured_files(name: str) -> list[Path]:
    """The files a section's figures depend on: its bench module, what it imports transitively, the
    package's `__init__` and its data files (the upload page)."""
    package = ROOT / PACKAGE
    seen: set[Path] = set()
    todo = [ROOT / "benchmarks" / f"bench_{name}.py", package / "__init__.py"]
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += imported_files(path)
    data = {f for f in package.rglob("*") if f.is_file() and f.suffix not in (".py", ".pyc")
            and "__pycache__" not in f.parts}
    return sorted(seen | data)


def code_fingerprint(name: str) -> str:
    """A hash of the code a section measures, as it is on disk (a `+dirty` commit names no code)."""
    digest = hashlib.sha256()
    for path in measured_files(name):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def mark_staleness(name: str, section: str) -> str:
    """The section with a stale line under its heading when its code fingerprint no longer matches."""
    section = re.sub(r"\n\n" + re.escape(STALE) + r"[^\n]*", "", section)
    stamped = re.search(r", code (\w+),", section)
    if stamped and stamped.group(1) == code_fingerprint(name):
        return section
    heading, _, rest = section.partition("\n")
    stamp = stamped.group(1) if stamped else "unknown"
    return (f"{heading}\n\n{STALE}the code it measured (`benchmarks/bench_{name}.py` and the modules it "
            f"imports) changed since this ran (code fingerprint {stamp}); rerun "
            f"`python -m benchmarks.run {name}`.\n{rest}")


def commit(name: str) -> str:
    """The commit measured, `+dirty` when the code the section measures (`measured_files`) differs
    from it in the working tree (other files, this run's docs/benchmarks.md among them, do not)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    measured = [str(path.relative_to(ROOT)) for path in measured_files(name)]
    dirty = git("status", "--porcelain", "--", *measured)
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if dirty else "")


def trailer(text: str) -> str:
    """What follows the last section: figures measured outside `make bench` (by tests), kept."""
    ends = list(re.finditer(r"<!-- /bench:\w+ -->\n", text))
    return text[ends[-1].end():] if ends else ""


def write(done: dict[str, str]) -> None:
    kept = trailer(DOC.read_text()) if DOC.exists() else ""
    parts = [HEADER]
    for name in [n for n in ORDER if n in done]:
        parts.append(f"<!-- bench:{name} -->\n{done[name]}<!-- /bench:{name} -->\n")
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(parts) + kept)


if __name__ == "__main__":
    if sys.argv[1:2] == [SECTION_FLAG]:
        measure_section(sys.argv[2], Path(sys.argv[3]))
    else:
        sys.exit(main(sys.argv[1:]))
