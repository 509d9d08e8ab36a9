"""The summary printer: every stage's `lines()` puts its values in one column."""

from __future__ import annotations

from imageiq_spark.core.summary import Stopwatch, aligned


def test_values_start_in_one_column_at_least_fourteen_characters_in():
    assert aligned([("model", "imageiq version 1"), ("quarantined", 0)]) == [
        "model:        imageiq version 1",
        "quarantined:  0",
    ]


def test_a_longer_label_widens_the_column_for_every_row():
    assert aligned([("registered version", "1"), ("gate", "no champion yet")]) == [
        "registered version: 1",
        "gate:               no champion yet",
    ]


def test_a_label_over_the_widest_column_overflows_alone():
    assert aligned([("windows", 1), ("latest window (2026-12-02 00:00)", "label_psi=0.9569")]) == [
        "windows:      1",
        "latest window (2026-12-02 00:00): label_psi=0.9569",
    ]


def test_floats_show_four_decimals_and_other_values_as_written():
    assert aligned([("ECE", 0.03125), ("images", 7), ("report", "file:/r.md")]) == [
        "ECE:          0.0312",
        "images:       7",
        "report:       file:/r.md",
    ]


def test_a_plain_line_is_kept_and_an_empty_value_leaves_a_heading():
    assert aligned([("alerts", 1), "  critical label_js = 0.2748 > 0.12", ("pending", "")]) == [
        "alerts:       1",
        "  critical label_js = 0.2748 > 0.12",
        "pending:",
    ]


def test_the_elapsed_row_splits_the_fixed_part_from_the_rate_of_the_work():
    watch = Stopwatch(started=100.0)
    watch.work(at=103.5)
    watch.work(at=102.0)  # a micro-batch marked earlier: the earliest mark counts
    watch.stopped = 112.0

    assert watch.row(500) == ("elapsed", "12.0 s: 2.0 s before the first image, then 50.0 images/s")


def test_work_marked_done_shows_the_part_after_the_last_image_apart():
    watch = Stopwatch(started=100.0)
    watch.work(at=104.0)
    watch.finished = 114.0  # then statistics, the grid and the counts
    watch.stopped = 117.5

    assert watch.row(2000) == ("elapsed", "17.5 s: 4.0 s before the first image, then 200.0 images/s, "
                                          "3.5 s after the last")


def test_a_pace_under_one_a_second_shows_seconds_per_item_in_its_unit():
    watch = Stopwatch(started=100.0)
    watch.work(at=110.5)
    watch.stopped = 239.0

    assert watch.row(1) == ("elapsed", "139.0 s: 10.5 s before the first image, then 128.5 s per image")
    assert watch.row(50, "predictions") == (
        "elapsed", "139.0 s: 10.5 s before the first prediction, then 2.6 s per prediction")


def test_a_run_with_nothing_to_work_on_says_so():
    watch = Stopwatch(started=100.0)
    watch.stopped = 101.25

    assert watch.row(0) == ("elapsed", "1.2 s, nothing to work on")
