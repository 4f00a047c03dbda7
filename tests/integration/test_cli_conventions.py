"""What every `sfworkflow` command promises, checked by running the installed entry point as an operator does:
`--version`; a description for every command; errors on stderr with the documented exit codes; one age grammar;
progress (count, rate, ETA) on a terminal and one quiet summary line otherwise; shell completion.

A terminal is a pseudo-terminal (`pty`) given to the command as its stdout and stderr; "otherwise" is a pipe.
"""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

import sfworkflow
from sfworkflow.cli.exit_codes import MEANINGS, ExitCode
from sfworkflow.cli.main import build_parser, subcommands
from sfworkflow.core.durations import WITH_UNITS
from sfworkflow.settings import Settings
from tests.conftest import PG_SERVER, _admin, wait_for
from tests.integration.helpers_extra import DEAD_Q, events_depth, queue_depth, quick, wait_all_published
from tests.integration.test_deadletters_cli import _dead_headers, _put_dead
from tests.support import TENANT, Amqp, enrolled_data, event, running_service

REPO = Path(__file__).resolve().parents[2]
SFWORKFLOW = Path(sys.executable).parent / "sfworkflow"  # the installed entry point
DOWN_PG = "postgresql://postgres:secret@127.0.0.1:1/x"  # nothing listens on port 1
N = 5  # items of work seeded for each long operation
# With two definition versions of `sequence` loaded, as a release that adds v2 has (the shipped one has one).
RELEASE_2 = (
    "import sys\n"
    "from sfworkflow.cli import versions\n"
    "from sfworkflow.cli.main import main\n"
    "from sfworkflow.workflows import DEFINITIONS\n"
    "from tests.unit.test_versions import V2\n"
    "versions.loaded_definitions = lambda: (*DEFINITIONS, V2)\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _env(**env: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SFWORKFLOW_")} | env


def _run(argv: list[str], command: list[str] | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`sfworkflow ARGV` with pipes for stdout and stderr (not a terminal)."""
    return subprocess.run(
        [*(command or [str(SFWORKFLOW)]), *argv], cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=60
    )


def _run_on_terminal(argv: list[str], command: list[str] | None = None, **env: str) -> tuple[int, str]:
    """`sfworkflow ARGV` with a pseudo-terminal as stdout and stderr: its exit code and all it wrote there."""
    rc, terminal, _ = _on_terminal(argv, command, pipe_stdout=False, env=env)
    return rc, terminal


def _on_terminal(
    argv: list[str], command: list[str] | None, *, pipe_stdout: bool, env: dict[str, str]
) -> tuple[int, str, str]:
    """`sfworkflow ARGV` with a pseudo-terminal as stderr, and as stdout too unless `pipe_stdout` (then stdout
    is a pipe, as in `sfworkflow replay --all-stuck > results.txt`): its exit code, what the terminal got, and
    what the pipe got."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [*(command or [str(SFWORKFLOW)]), *argv],
        cwd=REPO,
        env=_env(TERM="xterm", **env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if pipe_stdout else slave,
        stderr=slave,
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"sfworkflow {' '.join(argv)} wrote nothing for 60 s: {b''.join(chunks)!r}")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal has exited
                break
            if not data:
                break
            chunks.append(data)
        piped = proc.stdout.read() if proc.stdout is not None else b""  # small: the results of N items
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace"), piped.decode()


# ---- --version, descriptions ----------------------------------------------------------------------------------


def test_version_prints_the_package_version() -> None:
    for command in ([str(SFWORKFLOW)], [sys.executable, "-m", "sfworkflow"]):
        done = _run(["--version"], command)
        assert (done.returncode, done.stdout, done.stderr) == (0, f"sfworkflow {sfworkflow.__version__}\n", "")


def test_every_command_at_every_level_has_a_description_longer_than_its_help() -> None:
    found = list(subcommands(build_parser()))
    paths = {" ".join(path) for path, _, _ in found}
    assert {"replay", "dead-letters", "dead-letters redrive", "outbox republish", "parked list", "completion"} <= paths
    for path, parser, short in found:
        assert short, f"{' '.join(path)} has no help (its line in the list of commands)"
        assert parser.description and len(parser.description) > len(short), f"{' '.join(path)}: no description"


@pytest.mark.parametrize("argv", [["replay"], ["dead-letters", "redrive"], ["outbox", "republish"], ["parked"]])
def test_help_of_a_command_prints_its_description(argv: list[str]) -> None:
    [parser] = [p for path, p, _ in subcommands(build_parser()) if list(path) == argv]
    assert parser.description is not None
    done = _run([*argv, "--help"])
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert " ".join(parser.description.split()[:8]) in " ".join(done.stdout.split())


# ---- errors: stderr, one line (argparse: usage and the error), the documented exit code -----------------------


def _assert_error(done: subprocess.CompletedProcess[str], code: ExitCode, *words: str) -> None:
    assert (done.returncode, done.stdout) == (code, ""), (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in done.stderr, (word, done.stderr)


def test_usage_errors_go_to_stderr_and_exit_2() -> None:
    _assert_error(_run([]), ExitCode.USAGE, "usage: sfworkflow", "required: COMMAND")
    _assert_error(_run(["stuck", "--no-such-option"]), ExitCode.USAGE, "unrecognized arguments: --no-such-option")
    _assert_error(_run(["replay", "--all-stuck", "--limit", "many"]), ExitCode.USAGE, "--limit")
    _assert_error(_run(["diagram", "no_such_workflow"]), ExitCode.USAGE, "sfworkflow diagram: no workflow")
    _assert_error(_run(["inspect", "not-an-instance"]), ExitCode.USAGE, "TENANT/WORKFLOW/ENTITY")
    bad = _run(["stuck"], SFWORKFLOW_LOG_LEVEL="loud")
    _assert_error(bad, ExitCode.USAGE, "SFWORKFLOW_LOG_LEVEL")
    assert len(bad.stderr.splitlines()) == 1


def test_one_age_grammar_with_the_same_words_in_help_and_errors() -> None:
    for argv in (["stuck"], ["replay", "--all-stuck"], ["dead-letters", "purge"]):
        bad = _run([*argv, "--older-than", "3 fortnights"])
        _assert_error(bad, ExitCode.USAGE, "'3 fortnights' is not an age", WITH_UNITS)
        assert ("plain seconds" in bad.stderr) == (argv[-1] != "purge")  # a purge never offers what it refuses
        assert WITH_UNITS in " ".join(_run([*argv, "--help"]).stdout.split())
    # Weeks and decimals alike, everywhere (parsed before any connection: the database is down here).
    for argv in (["stuck"], ["replay", "--all-stuck", "--dry-run"]):
        for age in ("1w", "1.5h", "90"):
            _assert_error(_run([*argv, "--older-than", age], SFWORKFLOW_DATABASE_URL=DOWN_PG), ExitCode.FAILED)
    # A purge deletes: there a plain number (seconds elsewhere) is refused.
    for plain in ("30", "+30", "1e3", " 7 "):
        _assert_error(_run(["dead-letters", "purge", "--older-than", plain]), ExitCode.USAGE, f"{plain!r} has no unit")


async def test_a_database_without_sfworkflow_s_tables_is_one_line_and_exit_1() -> None:
    """Not a bug (exit 70) but a database not migrated, or the wrong one: exit 1 and what to do."""
    name = f"sfw_empty_{uuid.uuid4().hex[:12]}"
    await _admin(f'CREATE DATABASE "{name}"')
    try:
        for argv in (["stuck"], ["inspect", f"{TENANT}/sequence/x"], ["parked", "list"]):
            done = await asyncio.to_thread(_run, argv, SFWORKFLOW_DATABASE_URL=f"{PG_SERVER}/{name}")
            _assert_error(done, ExitCode.FAILED, "run `sfworkflow migrate`")
            assert len(done.stderr.splitlines()) == 1 and "bug" not in done.stderr, done.stderr
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_an_unreachable_database_is_one_line_on_stderr_and_exit_1() -> None:
    done = _run(["stuck"], SFWORKFLOW_DATABASE_URL=DOWN_PG)
    _assert_error(done, ExitCode.FAILED, "cannot reach PostgreSQL", "SFWORKFLOW_DATABASE_URL")
    assert len(done.stderr.splitlines()) == 1 and "secret" not in done.stderr


def test_an_unexpected_error_is_one_line_and_exit_70_with_the_traceback_at_debug() -> None:
    crash = (
        "import sys\n"
        "from sfworkflow.cli import main, stuck\n"
        "async def boom(settings, args):\n"
        "    raise RuntimeError('the impossible happened')\n"
        "stuck.run = boom\n"
        "sys.exit(main.main(sys.argv[1:]))\n"
    )
    command = [sys.executable, "-c", crash]
    done = _run(["stuck"], command)
    _assert_error(done, ExitCode.SOFTWARE, "unexpected error (RuntimeError: the impossible happened)", "a bug")
    assert len(done.stderr.splitlines()) == 1, done.stderr
    debug = _run(["stuck"], command, SFWORKFLOW_LOG_LEVEL="debug")
    assert debug.returncode == ExitCode.SOFTWARE, debug.stderr
    [logged] = [line for line in debug.stderr.splitlines() if "unexpected_error" in line]
    assert '"level":"debug"' in logged and '"name":"boom"' in logged  # the frames, up to where it was raised


def test_the_exit_codes_are_documented_in_help_and_readme() -> None:
    assert set(MEANINGS) == set(ExitCode)
    help_text = _run(["--help"]).stdout
    readme = (REPO / "README.md").read_text()
    commands = readme[readme.index("## Commands") :]
    commands = commands[: commands.index("\n## ", 1)]
    for code in ExitCode:
        assert re.search(rf"^  {int(code)} +\S", help_text, re.M), f"exit code {int(code)} not in --help"
        assert f"| `{int(code)}` |" in commands, f"exit code {int(code)} not in the README's Commands section"


# ---- shell completion ----------------------------------------------------------------------------------------


def _bash_complete(script: Path, *words: str) -> list[str]:
    """What bash offers after `sfworkflow WORDS` (the last word being completed), from the sourced script."""
    words_list = " ".join(f"'{w}'" for w in ("sfworkflow", *words))
    snippet = (
        f"source {script}\n"
        'fn=$(complete -p sfworkflow | sed -E "s/.*-F ([^ ]+).*/\\1/")\n'
        f"COMP_WORDS=({words_list}); COMP_CWORD={len(words)}\n"
        'COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}\n'
        '"$fn" sfworkflow "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bash_completion_completes_commands_subcommands_and_options(tmp_path: Path) -> None:
    done = _run(["completion", "bash"])
    assert done.returncode == 0 and done.stderr == "", done.stderr
    script = tmp_path / "sfworkflow.bash"
    script.write_text(done.stdout)
    commands = _bash_complete(script, "")
    assert {"replay", "dead-letters", "stuck", "migrate-instances", "completion"} <= set(commands)
    assert _bash_complete(script, "dead-letters", "re") == ["redrive"]
    assert _bash_complete(script, "replay", "--all") == ["--all-stuck"]
    assert _bash_complete(script, "completion", "") == ["bash", "zsh", "tcsh"]


def test_zsh_completion_names_every_command() -> None:
    done = _run(["completion", "zsh"])
    assert done.returncode == 0 and done.stdout.startswith("#compdef sfworkflow"), done.stderr
    for path, _, _ in subcommands(build_parser()):
        assert f"{path[-1]}:" in done.stdout, path
    assert "list, show, redrive or purge" in done.stdout  # the one-line help, not the whole description
    assert _run(["completion", "fish"]).returncode == ExitCode.USAGE


# ---- progress: count, rate and ETA on a terminal; one summary line otherwise -----------------------------------

ON_TERMINAL = r"{what}: \d+/{n} \(\d+%\) {unit}  \d+\.\d/s  ETA \d+:\d\d"
AT_THE_END = r"{what}: {n}/{n} \(100%\) {unit}  \d+\.\d/s  done in \d+:\d\d"
SUMMARY = r"{what}: {n} {unit} in \d+\.\ds \(\d+\.\d/s\)\n"


def _assert_progress(
    mode: str, rc: int, out: str, err: str, what: str, unit: str, n: int = N, code: ExitCode = ExitCode.OK
) -> None:
    """`out` and `err` as the command wrote them (on a terminal both are in `out`)."""
    assert rc == code, (rc, out, err)
    fill = {"what": re.escape(what), "unit": re.escape(unit), "n": n}
    if mode == "pipe":
        assert re.fullmatch(SUMMARY.format(**fill), err), err  # exactly one line, no carriage return
        assert "\r" not in out + err and "ETA" not in out + err
    elif mode == "results-piped":  # the progress on the terminal (stderr), the results alone in the pipe
        assert re.search(ON_TERMINAL.format(**fill), err), err
        assert re.search(AT_THE_END.format(**fill), err), err
        assert "\r" not in out and "\x1b" not in out and "ETA" not in out and f"{what}:" not in out, out
    else:
        assert re.search(ON_TERMINAL.format(**fill), out), out
        assert re.search(AT_THE_END.format(**fill), out), out
        assert "\r\x1b[K" in out  # redrawn in place


def _command(mode: str, argv: list[str], settings: Settings, command: list[str] | None = None) -> tuple[int, str, str]:
    env = {"SFWORKFLOW_DATABASE_URL": settings.database_url, "SFWORKFLOW_AMQP_URL": settings.amqp_url}
    if mode == "pipe":
        done = _run(argv, command, **env)
        return done.returncode, done.stdout, done.stderr
    if mode == "results-piped":  # stdout to a file or a pipe, stderr still the operator's terminal
        rc, terminal, out = _on_terminal(argv, command, pipe_stdout=True, env=env)
        return rc, out, terminal
    rc, out = _run_on_terminal(argv, command, **env)
    return rc, out, ""


async def _in_state(pg: asyncpg.Connection, state: str, n: int) -> bool:
    return await pg.fetchval("SELECT count(*) FROM sfworkflow.instance WHERE state = $1", state) == n


async def _seed_sending(settings: Settings, pg: asyncpg.Connection) -> None:
    """N sequence instances waiting for an answer to their send_step command (no worker answers)."""
    async with running_service(quick(settings)), Amqp(settings.amqp_url) as mq:
        for i in range(N):
            await mq.publish(event("sequence.enrolled", f"hung-{i}", enrolled_data(steps=1)))
        await wait_for(lambda: _in_state(pg, "sending", N), what=f"{N} instances sending")
        await wait_all_published(pg)


@pytest.mark.parametrize("mode", ["pipe", "terminal", "results-piped"])
async def test_replay_all_stuck_shows_progress(settings: Settings, pg: asyncpg.Connection, mode: str) -> None:
    await _seed_sending(settings, pg)
    await pg.execute("UPDATE sfworkflow.instance SET state_entered_at = now() - interval '20 minutes'")
    argv = ["replay", "--all-stuck", "--reason", "progress test"]
    rc, out, err = await asyncio.to_thread(_command, mode, argv, settings)
    _assert_progress(mode, rc, out, err, "replay", "instance(s)")
    assert out.count("reissue_command") == N and f"summary: done {N}" in out
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.history WHERE outcome = 'replayed'") == N


@pytest.mark.parametrize("mode", ["pipe", "terminal"])
async def test_dead_letters_redrive_shows_progress(settings: Settings, pg: asyncpg.Connection, mode: str) -> None:
    async with running_service(quick(settings)):  # declares the queues and exchanges, then stops
        pass
    at = datetime.now(UTC) - timedelta(hours=1)
    for i in range(N):
        body = f'{{"event_type": "sequence.enrolled", "n": {i}}}'.encode()
        await _put_dead(settings.amqp_url, body, _dead_headers("unknown_event_type", "sequence.enrolled", at))
    rc, out, err = await asyncio.to_thread(_command, mode, ["dead-letters", "redrive"], settings)
    _assert_progress(mode, rc, out, err, "redrive", "dead letter(s) read")
    assert out.count("redriven ") == N and f"{N} redriven, 0 refused, 0 failed" in out
    assert (await queue_depth(settings.amqp_url, DEAD_Q))[0] == 0
    assert (await events_depth(settings.amqp_url))[0] == N


@pytest.mark.parametrize("mode", ["pipe", "terminal"])
async def test_migrate_instances_shows_progress(settings: Settings, pg: asyncpg.Connection, mode: str) -> None:
    await _seed_sending(settings, pg)
    argv = ["migrate-instances", "--workflow", "sequence", "--from", "1", "--to", "2", "--batch-size", "2"]
    rc, out, err = await asyncio.to_thread(_command, mode, argv, settings, [sys.executable, "-c", RELEASE_2])
    _assert_progress(mode, rc, out, err, "migrate-instances", "instance(s)")
    assert out.count("v1 sending -> v2 sending") == N and f"migrated {N}, refused 0, skipped 0" in out
    assert await pg.fetchval("SELECT count(*) FROM sfworkflow.instance WHERE definition_version = 2") == N
