"""Paired A/B of `imageiq serve` builds: is a serve figure that moved between two benchmark runs the
code, the stack or the host?

Every build serves the same registered small CNN (random weights) from the same lake, all servers
up at once; each round runs every build at concurrency 1 and 32 back to back, the order reversed
every other round, so the host's drift over minutes hits every build alike. Not part of
`make bench`: a tool for a regression hunt.

    git worktree add --detach /tmp/old <commit>
    python -m benchmarks.serve_ab old=/tmp/old new=. [numpy1=.@/path/to/other/venv/bin/python]

A build is NAME=CHECKOUT, optionally @PYTHON to run it in another venv (another stack).
`IMAGEIQ_AB_ROUNDS` rounds (default 4) of `BENCH_SERVE_SECONDS` (default 8) per row.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks import bench_serve
from benchmarks.common import bench_config

CONCURRENCY = (1, 32)


def parse_builds(arguments: list[str]) -> dict[str, tuple[Path, str]]:
    """{name: (checkout, python)} from NAME=CHECKOUT[@PYTHON] arguments."""
    builds = {}
    for argument in arguments:
        name, _, target = argument.partition("=")
        checkout, _, python = target.partition("@")
        if not name or not checkout:
            raise SystemExit(f"a build is NAME=CHECKOUT[@PYTHON], got {argument!r}")
        builds[name] = (Path(checkout).resolve(), python or sys.executable)
    return builds


def main(arguments: list[str]) -> int:
    builds = parse_builds(arguments)
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
            for name, (checkout, python) in builds.items():
                port = bench_serve.free_port()
                servers[name] = subprocess.Popen(
                    [python, "-m", "imageiq_spark", "--conf", str(conf), "serve", "--port", str(port)],
                    cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)}, stdout=subprocess.DEVNULL,
                    stderr=(work / f"{name}.log").open("wb"))
                urls[name] = f"http://127.0.0.1:{port}"
            for name, server in servers.items():
                bench_serve.wait_ready(urls[name] + "/v2/health/ready", server)
            rates: dict[tuple[str, int], list[float]] = {(n, c): [] for n in builds for c in CONCURRENCY}
            for round_ in range(rounds):
                for name in list(builds)[::1 if round_ % 2 == 0 else -1]:
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
