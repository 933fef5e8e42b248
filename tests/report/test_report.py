"""Visibility parts without Ray: the progress line's counting, durations, the peak sampler."""

import io
import threading

import pytest

from lmbatch.report.progress import Progress
from lmbatch.report.samplers import PeakSampler
from lmbatch.report.summary import duration, format_summary


def test_peak_sampler_keeps_the_peak_of_each_figure():
    """The one sampling thread behind peak RSS and the object-store peak: first and last samples
    are taken even for work shorter than the interval; tuples keep a peak per figure."""
    readings = iter([(1, 5), (4, 2), (3, 3)])
    with PeakSampler(lambda: next(readings), interval=3600) as sampler:
        pass  # shorter than one interval: the samples on entry and exit
    assert sampler.peak == (4, 5)
    with PeakSampler(None, interval=1) as unmeasurable:
        pass
    assert unmeasurable.peak is None

    def gone():
        raise ProcessLookupError
    with PeakSampler(gone, interval=1) as failing:
        pass
    assert failing.peak is None


def test_a_stopping_job_does_not_wait_on_its_sampler():
    """A job stopped by a scheduler's SIGTERM to all its processes had Ray's GCS die with it, and a
    sample (a call to the GCS) then blocked the driver's exit for Ray's 60 s GCS timeout."""
    calls, sampling, gcs_back = [], threading.Event(), threading.Event()

    def measure():  # answers on entry, then hangs once (for up to a minute) as a call to a dead GCS does
        calls.append(1)
        if len(calls) == 2:
            sampling.set()
            gcs_back.wait(60)
        return len(calls)

    with pytest.raises(SystemExit):
        with PeakSampler(measure, interval=0.01) as sampler:
            sampling.wait(10)
            raise SystemExit(143)
    assert sampler._thread.is_alive() and len(calls) == 2  # not joined, and no last sample taken
    gcs_back.set()


def summary(chunk, rows, tokens):
    return {"chunk": chunk, "replica": "r", "rows": rows, "errors": 0, "cut_rows": 0, "repeated_rows": 0,
            "truncated_rows": 0, "error_kinds": "{}", "seconds": 1.0, "ready_at": 0.0, "prompt_tokens": 0,
            "padded_prompt_tokens": 0, "generated_tokens": tokens, "decode_slots": 0, "split_retries": 0,
            "shared_prefix_tokens": 0}


def test_progress_counts_rows_inside_running_chunks_once():
    """Rows reported from inside a running chunk count until its summary is in, then only the summary
    does; a chunk reported by two replicas (a retry) counts once; the line never goes backwards."""
    out = io.StringIO()
    progress = Progress(total_rows=100, done_rows=10, stream=out)
    progress.update_live([("a", 5, 50), ("b", 7, 70), ("b", 3, 30)])
    progress.print_line()
    progress.add([summary("a", 20, 200)])
    progress.update_live([("a", 20, 200), ("c", 1, 10)])  # a's last report, after its summary
    progress.print_line()
    progress.update_live([("c", 0, 0)])  # its replica moved on before b's summary came in
    progress.print_line()
    lines = out.getvalue().splitlines()
    assert [line.split("] ")[2].split(" rows")[0] for line in lines] == ["22/100", "31/100", "31/100"]
    assert progress.metrics()["rows_this_run"] == 20  # metrics count finished chunks only
    assert " | eta " not in lines[0] and " | eta " in lines[1]  # the pace needs two lines with rows
    assert " gen tok/s | " in lines[0]
    embedding = Progress(total_rows=100, stream=out, generates=False)  # nothing generated: the pace in rows
    embedding.update_live([("a", 5, 0)])
    embedding.print_line()
    embedding.update_live([("a", 9, 0)])
    embedding.print_line()
    last = out.getvalue().splitlines()[-1]
    pace = last.split(" rows/s | 0 errors")[0].split()[-1]
    assert float(pace.replace(",", "")) > 0 and "gen tok/s" not in last


def test_progress_says_replicas_are_starting_until_all_are_ready():
    """Start-up (Ray, model loads) can take minutes on a cluster with 0 rows to show: the line says
    how many replicas are ready until all are; a restarted replica's second report does not undo it."""
    out = io.StringIO()
    progress = Progress(total_rows=100, stream=out, replicas=2)
    for ready in (0, 1, 2, 1):
        progress.update_live([], ready)
        progress.print_line()
    quick = Progress(total_rows=100, stream=out, replicas=2)
    quick.add([summary("a", 60, 600)])  # a replica's summary came before its ready report
    quick.print_line()
    quick.add([{**summary("b", 40, 400), "replica": "s"}])  # all rows done: nothing is starting any more
    quick.print_line()
    lines = out.getvalue().splitlines()
    assert [line.partition(" | replicas starting: ")[2] for line in lines] == ["0/2 ready", "1/2 ready", "", "",
                                                                              "1/2 ready", ""]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    progress = Progress(total_rows=100, stream=terminal, replicas=1)
    for ready in (0, 1):
        progress.update_live([], ready)
        progress.print_line()
    longer, shorter = terminal.getvalue().split("\r")[1:]  # one line, rewritten in place
    assert "starting" in longer and len(shorter) == len(longer) and shorter.endswith(" " * 20)


def test_progress_shows_chunks_restarted_once_a_replica_died():
    out = io.StringIO()
    progress = Progress(total_rows=100, stream=out)
    for restarts in (0, 2):
        progress.update_live([], 0, restarts)
        progress.print_line()
    quiet, restarted = out.getvalue().splitlines()
    assert "restarted" not in quiet and restarted.endswith("0s | 2 chunks restarted")
    assert progress.metrics()["chunk_restarts"] == 2


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (7, 192, 7380)] == ["7s", "3m12s", "2h03m"]


def test_summary_shows_what_the_operations_page_lists():
    """The end-of-run table: rows, errors by kind, tokens, rates, efficiencies, start-up (from the
    first replica ready), wall time and each replica."""
    progress = Progress(total_rows=40, stream=io.StringIO())
    chunk = {**summary("a", 40, 400), "errors": 2, "error_kinds": '{"too long": 2}', "repeated_rows": 3, "cut_rows": 19,
             "truncated_rows": 5, "shared_prefix_tokens": 1200,
             "ready_at": progress.started_wall + 12.5, "prompt_tokens": 90, "padded_prompt_tokens": 100,
             "decode_slots": 500}
    progress.add([chunk])
    metrics = progress.metrics()
    assert metrics["startup_seconds"] == 12.5
    assert metrics["prompt_tokens_per_s"] / metrics["generated_tokens_per_s"] == pytest.approx(90 / 400, rel=0.01)
    totals = {"rows": 40, "rows_ok": 38, "rows_error": 2, "rows_error_by_kind": {"too long": 2}}
    table = format_summary(metrics, totals)
    assert "(this run)" not in table and "retry_errors" not in table  # the run made the whole output
    for line in ["rows ok / error 38 / 2", "errors by kind too long: 2",
                 "tokens in / out 90 / 400", "prompt tokens/s ", "padding efficiency 0.9",
                 "decode slot efficiency 0.8", "start-up 12.5s", "replica r",
                 "rows repeating a prompt 3 (greedy: each copied from the first row of its chunk",
                 "prompts truncated 5 (too long for the context or input.max_prompt_tokens: cut to fit, as "
                 "input.on_too_long says)",
                 "prompt tokens shared 1,200 (the prefix all prompts of a micro-batch begin with, computed once",
                 "rows cut at token limit 19 (50% of the rows ok this run: finish_reason length); raise "
                 "generation.max_new_tokens if they should end on their own"]:
        assert " ".join(line.split()) in " ".join(table.split()), table
    progress.add([summary("b", 160, 0)])  # 19 of 198 rows ok: under a tenth, too few to note
    totals = {**totals, "rows": 200, "rows_ok": 198}
    assert "cut at token limit" not in format_summary(progress.metrics(), totals)
    held = format_summary(progress.metrics(), totals, held_to_pattern=True)  # held to a schema, any cut text is noted
    assert ("rows cut at token limit 19 (10% of the rows ok this run: finish_reason length); a text held to a "
            "json_schema or regex that is cut is not one it accepts") in " ".join(held.split())

    # A resumed run: the output's errors, an earlier run's out-of-memory row among them, and its own.
    resumed = Progress(total_rows=80, done_rows=40, stream=io.StringIO())
    resumed.add([chunk])
    totals = {"rows": 80, "rows_ok": 77, "rows_error": 3, "rows_error_by_kind": {"too long": 2, "out of memory": 1}}
    table = format_summary(resumed.metrics(), totals)
    for line in ["errors by kind too long: 2, out of memory: 1",
                 "errors by kind (this run) too long: 2", "rows failed in generation once the cause is gone"]:
        assert " ".join(line.split()) in " ".join(table.split()), table
