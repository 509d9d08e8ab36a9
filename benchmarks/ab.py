"""Paired A/B of builds: is a figure that moved between two benchmark runs the code, the stack or
the host? Rounds interleave the builds, the order reversed every other round, so the host's drift
over minutes hits every build alike. Not part of `make bench`: a tool for a regression hunt.

    git worktree add --detach /tmp/old <commit>
    python -m benchmarks.ab serve old=/tmp/old new=.
    python -m benchmarks.ab run-all old=/tmp/old new=. spark40=.@.venv-compat-4.0/bin/python@jars/compat-4.0

A build is NAME=CHECKOUT[@PYTHON[@JARS]]: another venv (another stack) and its jars folder.
`IMAGEIQ_AB_ROUNDS` rounds (default 4 for serve, 2 for run-all).
- serve: every build serves the same registered small CNN (random weights) from one lake, all
  servers up at once; each round loads every build at concurrency 1 and 32 for
  `BENCH_SERVE_SECONDS` (default 8) each.
- run-all: bench_cluster's local column, `run-all` on 60 sample digits into a fresh lake per run;
  the whole command's seconds and each stage's summary `elapsed`.
- score-job: bench_score's small-CNN whole job (PNG bytes -> prediction rows) in a process per
  build and round (`benchmarks/ab_score_job.py`), 5 timed runs each after a warm-up; the median
  of each process, and each round's ratio of every build to the first.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchmarks import bench_cluster, bench_serve
from benchmarks.bench_serve import free_port
from benchmarks.common import bench_config

CONCURRENCY = (1, 32)
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Build:
    checkout: Path
    python: str
    jars: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.checkout), "IMAGEIQ_JARS_DIR": str(self.jars),
                "PYSPARK_PYTHON": self.python, "PYSPARK_DRIVER_PYTHON": self.python}


def parse_builds(arguments: list[str]) -> dict[str, Build]:
    """{name: build} from NAME=CHECKOUT[@PYTHON[@JARS]] arguments."""
    builds = {}
    for argument in arguments:
        name, _, target = argument.partition("=")
        checkout, python, jars = (target.split("@") + ["", ""])[:3]
        if not name or not checkout:
            raise SystemExit(f"a build is NAME=CHECKOUT[@PYTHON[@JARS]], got {argument!r}")
        python = str(Path(python).absolute()) if python else sys.executable  # a venv's link, kept
        builds[name] = Build(Path(checkout).resolve(), python, Path(jars or ROOT / "jars").resolve())
    return builds


def interleaved(names: list[str], rounds: int) -> Iterator[tuple[int, str]]:
    for round_ in range(rounds):
        for name in names[::1 if round_ % 2 == 0 else -1]:
            yield round_, name


def serve(builds: dict[str, Build]) -> None:
    rounds = int(os.environ.get("IMAGEIQ_AB_ROUNDS", "4"))
    seconds = float(os.environ.get("BENCH_SERVE_SECONDS", "8"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench_serve.write_jpegs(work / "jpegs", bench_serve.IMAGES)
        sections = {"storage": {"root": str(work / "lake")}, "mlflow": {"registered_model": "serve_ab"},
                    "serve": {"alias_poll_s": 0}}
        bench_serve.register_model(bench_config(work / "lake", **sections), "small_cnn", 32)
        # Only keys every build knows: an older build refuses the keys it does not.
        conf = work / "serve_ab.yaml"
        conf.write_text(yaml.safe_dump(sections))
        servers, urls = {}, {}
        try:
            for name, build in builds.items():
                port = free_port()
                servers[name] = subprocess.Popen(
                    [build.python, "-m", "imageiq_spark", "--conf", str(conf), "serve", "--port", str(port)],
                    cwd=build.checkout, env=build.env(), stdout=subprocess.DEVNULL,
                    stderr=(work / f"{name}.log").open("wb"))
                urls[name] = f"http://127.0.0.1:{port}"
            for name, server in servers.items():
                bench_serve.wait_ready(urls[name] + "/v2/health/ready", server)
            rates: dict[tuple[str, int], list[float]] = {(n, c): [] for n in builds for c in CONCURRENCY}
            for round_, name in interleaved(list(builds), rounds):
                for concurrency in CONCURRENCY:
                    load = bench_serve.generate_load(urls[name], "imageiq", work / "jpegs", concurrency,
                                                     seconds)
                    rates[name, concurrency].append(load["images_per_s"])
                    print(f"round {round_} {name} c={concurrency}: {load['images_per_s']:.0f} images/s, "
                          f"p50 {load['p50_ms']:.1f} ms, errors {load['errors']}", flush=True)
        finally:
            for server in servers.values():
                bench_serve.stop(server)
    for (name, concurrency), values in rates.items():
        print(f"{name} c={concurrency}: median {statistics.median(values):.0f} images/s "
              f"({', '.join(f'{v:.0f}' for v in values)})")


def run_all(builds: dict[str, Build]) -> None:
    from imageiq_spark.cli.sample_data import write_sample_data

    rounds = int(os.environ.get("IMAGEIQ_AB_ROUNDS", "2"))
    seconds: dict[str, list[dict[str, float]]] = {name: [] for name in builds}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_sample_data(work / "images", per_class=bench_cluster.IMAGES_PER_CLASS)
        for round_, name in interleaved(list(builds), rounds):
            build, run = builds[name], work / f"{name}-{round_}"
            # A registered model of its own per run: train must not skip as "nothing changed".
            settings = {**bench_cluster.COMMON, "spark_conf.spark.master": "local[2]",
                        "storage.root": run / "lake", "mlflow.registered_model": f"ab_{name}_{round_}"}
            stages = bench_cluster.run_all(settings, build.env(), str(work / "images"), run, build.python)
            seconds[name].append(stages)
            print(f"round {round_} {name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()),
                  flush=True)
    for name, runs in seconds.items():
        print(f"{name} medians: " + ", ".join(
            f"{stage} {statistics.median(run[stage] for run in runs):.1f} s" for stage in runs[0]))


def score_job(builds: dict[str, Build]) -> None:
    rounds = int(os.environ.get("IMAGEIQ_AB_ROUNDS", "4"))
    rates: dict[str, list[float]] = {name: [] for name in builds}
    for round_, name in interleaved(list(builds), rounds):
        build = builds[name]
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([build.python, str(ROOT / "benchmarks" / "ab_score_job.py"), tmp, "5"],
                                  env=build.env(), cwd=build.checkout, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"score job of {name} exited {done.returncode}: {done.stderr[-3000:]}")
        seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        rates[name].append(8192 / statistics.median(seconds))
        print(f"round {round_} {name}: {rates[name][-1]:.0f} images/s "
              f"({', '.join(f'{s:.2f}' for s in seconds)} s)", flush=True)
    first, *others = builds
    for name in builds:
        print(f"{name}: median {statistics.median(rates[name]):.0f} images/s "
              f"({', '.join(f'{v:.0f}' for v in rates[name])})")
    for name in others:
        ratios = [new / old for new, old in zip(rates[name], rates[first])]
        print(f"{name} / {first} per round: {', '.join(f'{r:.3f}' for r in ratios)}; "
              f"geometric mean {statistics.geometric_mean(ratios):.3f}")


def main(arguments: list[str]) -> int:
    modes = {"serve": serve, "run-all": run_all, "score-job": score_job}
    if not arguments or arguments[0] not in modes:
        raise SystemExit(f"usage: python -m benchmarks.ab {{{','.join(modes)}}} "
                         "NAME=CHECKOUT[@PYTHON[@JARS]] ...")
    modes[arguments[0]](parse_builds(arguments[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
