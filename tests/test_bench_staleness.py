"""docs/benchmarks.md: a section whose measured code changed since it ran says so."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# benchmarks/ is not a package of the wheel: loaded from the checkout.
_spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).parents[1] / "benchmarks/run.py")
run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run)

SECTION = ("## Score\n\nimages/s of the pipeline\n\n"
           "_Run 2026-12-02 at commit abc on 2 cores, code {code}, 3 s._\n")


def test_a_section_of_the_current_code_is_left_as_it_is():
    section = SECTION.format(code=run.code_fingerprint("score"))

    assert run.mark_staleness("score", section) == section


def test_a_section_of_other_code_gets_one_stale_line_under_its_heading():
    marked = run.mark_staleness("score", SECTION.format(code="0123456789ab"))

    assert marked.split("\n")[:4] == [
        "## Score", "",
        "**Stale:** the code it measured (`benchmarks/bench_score.py` and the modules it imports) changed "
        "since this ran (code fingerprint 0123456789ab); rerun `python -m benchmarks.run score`.", ""]
    assert run.mark_staleness("score", marked) == marked


def test_a_stale_section_rerun_on_the_current_code_loses_its_stale_line():
    marked = run.mark_staleness("score", SECTION.format(code="0123456789ab"))
    rerun = marked.replace("0123456789ab", run.code_fingerprint("score"))

    assert run.mark_staleness("score", rerun) == SECTION.format(code=run.code_fingerprint("score"))


def names(files: list[Path]) -> set[str]:
    return {str(f.relative_to(run.ROOT)) for f in files}


def test_a_section_measures_the_modules_its_benchmark_imports_and_theirs_but_not_other_stages():
    measured = names(run.measured_files("monitor"))

    assert {"benchmarks/bench_monitor.py", "benchmarks/common.py", "imageiq_spark/stages/monitor/__init__.py",
            "imageiq_spark/ml/drift.py", "imageiq_spark/core/config.py"} <= measured
    assert not {"imageiq_spark/serving/app.py", "imageiq_spark/stages/ingest/__init__.py",
                "benchmarks/bench_serve.py"} & measured


def test_a_section_that_runs_the_cli_measures_the_whole_package():
    package = names((run.ROOT / "imageiq_spark").rglob("*.py"))

    assert package <= names(run.measured_files("sizing"))
    assert package <= names(run.measured_files("serve"))  # `BIN / "imageiq"`, not an import


def test_a_section_that_imports_stages_by_a_name_made_at_run_time_measures_the_whole_package():
    package = names((run.ROOT / "imageiq_spark").rglob("*.py"))

    # bench_fixed_cost runs each stage as `import_quietly(f"imageiq_spark.stages.{stage}")`
    assert package <= names(run.measured_files("fixed_cost"))
