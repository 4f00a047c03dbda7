"""The progress line of long commands (sfworkflow/cli/progress.py), with a clock the test moves. Pure."""

from __future__ import annotations

import io

import pytest

from sfworkflow.cli.progress import CLEAR, Progress, clock_time


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
