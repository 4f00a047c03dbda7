"""The progress line of long commands (sfworkflow/cli/progress.py), with a clock the test moves. Pure, but for one
subprocess whose stdout's reader goes away."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from sfworkflow.cli.progress import CLEAR, Progress, clock_time

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_on_a_terminal_the_line_has_count_rate_and_eta_and_ends_with_the_time_it_took() -> None:
    clock, stream = Clock(), io.StringIO()
    with Progress("replay", 10, "instance(s)", stream=stream, tty=True, clock=clock) as p:
        clock.now += 2.0
        p.advance(4)  # 4 in 2 s: 2/s, 6 left: 3 s
        assert stream.getvalue().endswith(CLEAR + "replay: 4/10 (40%) instance(s)  2.0/s  ETA 0:03")
        clock.now += 0.01
        p.advance()  # too soon after the last redraw: not drawn
        assert "5/10" not in stream.getvalue()
        clock.now += 3.0
        p.advance(5)
    assert stream.getvalue().endswith(CLEAR + "replay: 10/10 (100%) instance(s)  2.0/s  done in 0:05\n")


def test_off_a_terminal_only_one_summary_line() -> None:
    clock, stream = Clock(), io.StringIO()
    with Progress("redrive", None, "dead letter(s) read", stream=stream, tty=False, clock=clock) as p:
        for _ in range(30):
            clock.now += 0.1
            p.advance()
    assert stream.getvalue() == "redrive: 30 dead letter(s) read in 3.0s (10.0/s)\n"


def test_a_line_printed_meanwhile_clears_the_status_line_first(capsys: pytest.CaptureFixture[str]) -> None:
    clock, stream = Clock(), io.StringIO()
    p = Progress("migrate-instances", 2, stream=stream, tty=True, clock=clock)
    clock.now += 1.0
    p.advance()
    p.echo("migrated T/sequence/e: v1 sending -> v2 sending")
    assert capsys.readouterr().out == "migrated T/sequence/e: v1 sending -> v2 sending\n"
    assert stream.getvalue().count(CLEAR) == 3  # drawn, cleared for the line, drawn again below it
    p.close()
    p.close()  # once only
    assert stream.getvalue().count("\n") == 1


def test_not_shown_writes_nothing() -> None:
    stream = io.StringIO()
    with Progress("replay", 1, stream=stream, tty=True, show=False) as p:
        p.advance()
    assert stream.getvalue() == ""


@pytest.mark.parametrize(("seconds", "text"), [(0, "0:00"), (7.4, "0:07"), (750, "12:30"), (7500, "2:05:00")])
def test_clock_time(seconds: float, text: str) -> None:
    assert clock_time(seconds) == text


@pytest.mark.parametrize("tty", [False, True])
def test_a_run_that_raises_claims_no_finish(tty: bool) -> None:
    """An error (or Ctrl-C) inside the block: no summary line and no `done in`; on a terminal the status line
    is erased, so the error's own line is the one that is left."""
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt), Progress("replay", 10, stream=stream, tty=tty, clock=Clock()) as p:
        p.advance(2)
        raise KeyboardInterrupt
    out = stream.getvalue()
    assert "done in" not in out and " in " not in out.rpartition(CLEAR)[2]
    assert out == "" if not tty else out.endswith(CLEAR)


def test_a_closed_stdout_stops_the_lines_not_the_work(tmp_path: Path) -> None:
    """`sfworkflow replay --all-stuck | head -1`: once stdout's reader is gone, echo drops the lines (no
    BrokenPipeError out of the operation's callback, which would abandon the items left) and the run goes on."""
    script = tmp_path / "closed.py"
    script.write_text(
        "import io, sys\n"
        "from sfworkflow.cli.progress import Progress\n"
        "p = Progress('replay', 3, stream=io.StringIO(), tty=False)\n"
        "with p:\n"
        "    for i in range(3):\n"
        "        p.echo(f'line {i} ' + 'x' * 100_000)\n"
        "        p.advance()\n"
        "sys.stderr.write(f'finished {p.done} output_closed={p.output_closed}\\n')\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader goes away before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "finished 3 output_closed=True" in err and "Traceback" not in err and "Exception ignored" not in err
