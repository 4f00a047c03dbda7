"""Command line: `sfworkflow run | migrate | demo | diagram | inspect`, plus the operator commands
of this package (stuck, replay, dead-letters, …)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine, Iterator
from typing import Any

from sfworkflow import __version__
from sfworkflow.cli.exit_codes import EPILOG, ExitCode
from sfworkflow.cli.progress import silence_stdout
from sfworkflow.errors import SfworkflowError, UsageError
from sfworkflow.settings import Settings, SettingsError, log_unknown_variables, redact_url


def _run(coro: Coroutine[Any, Any, int], settings: Settings) -> int:
    if settings.use_uvloop:
        try:
            import uvloop

            return uvloop.run(coro)
        except ImportError:
            pass
    return asyncio.run(coro)


async def _cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from sfworkflow.runtime.processes import process_count, run_processes

    n = process_count(settings, args.processes)
    if n > 1:
        return await run_processes(n, settings)
    from sfworkflow.runtime.service import Service

    return await Service(settings).run_until_signal()


async def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    import asyncpg

    from sfworkflow import db
    from sfworkflow.db import migrate

    created = await db.ensure_database(settings.database_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await migrate.migrate(conn)
    finally:
        await conn.close()
    if created:
        print("created the database")
    print(f"applied migrations {applied}" if applied else "schema is up to date")
    return 0


async def _cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from sfworkflow.cli.worker import DEMO_MISSING

    try:
        from sfworkflow.demo.run import run_demo
    except ImportError as exc:
        raise UsageError(DEMO_MISSING) from exc

    return await run_demo(settings, args)


async def _cmd_diagram(settings: Settings, args: argparse.Namespace) -> int:
    from sfworkflow.core import diagrams
    from sfworkflow.core.engine import Engine
    from sfworkflow.workflows import DEFINITIONS

    engine = Engine(DEFINITIONS)
    if args.write_docs:
        from sfworkflow.core import asyncapi

        diagrams.DOCS_PATH.parent.mkdir(parents=True, exist_ok=True)
        diagrams.DOCS_PATH.write_text(diagrams.workflows_doc(engine))
        print(f"wrote {diagrams.DOCS_PATH}")
        asyncapi.ASYNCAPI_PATH.write_text(asyncapi.render(engine))
        print(f"wrote {asyncapi.ASYNCAPI_PATH}")
        return 0
    if not args.workflow:
        raise UsageError("name a workflow (one of: " + ", ".join(sorted(engine.latest)) + ")")
    compiled = engine.workflow(args.workflow, args.version)
    if compiled is None:
        raise UsageError(f"no workflow {args.workflow!r} (known: {', '.join(sorted(engine.latest))})")
    print(diagrams.render(compiled, args.format), end="")
    return 0


async def _cmd_inspect(settings: Settings, args: argparse.Namespace) -> int:
    from sfworkflow.ops.inspect import inspect_instance

    return await inspect_instance(settings, args.instance, as_json=args.json)


def _at_least_zero(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


class ParagraphFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description or epilog to the terminal, but keeps indented lines (a table) as
    they are written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for paragraph in text.split("\n\n"):
            if paragraph.startswith(" ") or "\n " in paragraph:
                out.append("\n".join(indent + line for line in paragraph.splitlines()))
            else:
                out.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the one source of `--help`, of the checks on arguments and of shell completion."""
    p = argparse.ArgumentParser(
        prog="sfworkflow",
        description="Durable workflows for SalesFlow: the service (run), its schema (migrate) and the operator "
        "commands. `sfworkflow COMMAND --help` says what a command does and takes. Settings come from "
        "SFWORKFLOW_* variables (README, Configuration). Errors go to stderr, one line saying what to do.",
        epilog=EPILOG,
        formatter_class=ParagraphFormatter,
    )
    p.add_argument("--version", action="version", version=VERSION_LINE, help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser(
        "run",
        help="run the service: consumer, outbox relay, timers, HTTP",
        description="Run the service until SIGTERM or SIGINT: the RabbitMQ consumer, the outbox relay, the timer "
        "loop and HTTP (health, readiness, metrics, admin API). Creates the database if missing and applies "
        "migrations first, and waits for PostgreSQL and RabbitMQ (30 s). Exits 0 after a graceful stop, 70 when a "
        "background task died (for the orchestrator to restart it), 1 when it could not start.",
    )
    r.add_argument(
        "--processes",
        type=_at_least_zero,
        default=None,
        help="service processes, each a replica with HTTP on SFWORKFLOW_HTTP_PORT + its index "
        "(default: SFWORKFLOW_PROCESSES, 1; 0: one per usable core)",
    )
    sub.add_parser(
        "migrate",
        help="create the database if missing and apply SQL migrations",
        description="Create the database named in SFWORKFLOW_DATABASE_URL if it is missing and apply the "
        "numbered SQL migrations not applied yet. Idempotent and safe to run from two "
        "replicas at once; `run` does it too, so use it to prepare a database ahead of a deploy.",
    )
    d = sub.add_parser(
        "demo",
        help="run the service with a simulated SalesFlow worker and demo traffic",
        description="The quick-start demo: run the service with a simulated SalesFlow worker, drive --instances "
        "workflow instances with failures, duplicates and replies at the given rates, wait for every one to end "
        "and print what happened. From a checkout (the demo code is not in the service image).",
    )
    d.add_argument("--instances", type=int, default=300, help="workflow instances to drive (default 300)")
    d.add_argument(
        "--workflow", action="append", help="only this workflow (repeatable; default: every workflow in the mix)"
    )
    d.add_argument("--failure-rate", type=float, default=0.08, help="share of sends that fail retryably")
    d.add_argument("--fatal-rate", type=float, default=0.01, help="share of sends that fail for good")
    d.add_argument("--consent-rate", type=float, default=0.02, help="share of sends failing consent_missing")
    d.add_argument("--duplicate-rate", type=float, default=0.05, help="share of events published twice")
    d.add_argument("--reply-rate", type=float, default=0.05, help="share of instances ended by people (replies)")
    d.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for every instance to end")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument(
        "--hang", type=int, default=0, help="leave N sequence instances stuck: the worker never answers them"
    )
    g = sub.add_parser(
        "diagram",
        help="print a workflow's state machine as Mermaid, Graphviz DOT or SVG",
        description="Print a workflow's state machine, generated from its definition (states, triggers, "
        "timers), in the --format asked; or, with --write-docs, regenerate docs/workflows.md and "
        "docs/asyncapi.json from every loaded definition.",
    )
    g.add_argument("workflow", nargs="?", help="workflow name, e.g. sequence")
    g.add_argument("--format", choices=("mermaid", "dot", "svg"), default="mermaid")
    g.add_argument("--version", type=int, default=None, help="definition version (default: the latest)")
    g.add_argument(
        "--write-docs", action="store_true",
        help="regenerate docs/workflows.md and docs/asyncapi.json from every definition",
    )  # fmt: skip
    i = sub.add_parser(
        "inspect",
        help="show one instance: state, context, history, timers, outbox, parked",
        description="Show everything about one instance: its state and context, its history (every event, "
        "transition and replay), pending timers, outbox rows (published or not) and parked events. Exits 1 when "
        "there is no such instance.",
    )
    i.add_argument("instance", help="TENANT/WORKFLOW/ENTITY")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    c = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh, tcsh)",
        description="Print the completion script of sfworkflow for a shell, generated from this parser "
        "(commands, options, choices). Install it with: "
        "sfworkflow completion bash > ~/.local/share/bash-completion/completions/sfworkflow, or for zsh: "
        'sfworkflow completion zsh > "${fpath[1]}/_sfworkflow" (then start a new shell).',
    )
    c.add_argument("shell", choices=COMPLETION_SHELLS, help="the shell to complete in")
    from sfworkflow.cli.commands import register_all

    COMMANDS.update(register_all(sub))
    return p


COMPLETION_SHELLS = ("bash", "zsh", "tcsh")
VERSION_LINE = f"sfworkflow {__version__}"


def completion_script(shell: str) -> str:
    """The completion script for `shell`, generated by shtab from `build_parser()`. Menus (zsh) show each
    command's one-line help rather than its description, which shtab would take when there is one."""
    import shtab

    parser = build_parser()
    for _, subparser, short in subcommands(parser):
        subparser.description = short or subparser.description
    return str(shtab.complete(parser, shell=shell))


def subcommands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """Every sub-command at every level: its path (`("dead-letters", "redrive")`), its parser and its help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._get_subactions()}
            for name, subparser in action.choices.items():
                yield (*path, name), subparser, helps.get(name)
                yield from subcommands(subparser, (*path, name))


COMMANDS: dict[str, Any] = {
    "run": _cmd_run,
    "migrate": _cmd_migrate,
    "demo": _cmd_demo,
    "diagram": _cmd_diagram,
    "inspect": _cmd_inspect,
}


# The commands that run the service: they wait for a dependency that is down, and log each wait.
SERVICE_COMMANDS = frozenset({"run", "demo"})


def _quiet_drivers() -> None:
    """aiormq logs each failed connection attempt as an ERROR of its own; a command reports it in one line."""
    logging.getLogger("aiormq.connection").setLevel(logging.CRITICAL)


# What `sfworkflow[service]` adds to the producer and worker SDK.
SERVICE_MODULES = ("aiohttp", "transitions", "grandalf", "croniter")


def missing_service_modules() -> list[str]:
    """The service's modules this installation lacks (a `pip install sfworkflow` without the extra)."""
    import importlib.util

    return [m for m in SERVICE_MODULES if importlib.util.find_spec(m) is None]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:  # answered by an SDK-only installation too (argparse says the same below)
        print(VERSION_LINE)
        return ExitCode.OK
    missing = missing_service_modules()
    if missing:
        print(
            f"sfworkflow: this installation has the producer and worker SDK only (no {', '.join(missing)}); "
            "install the service and its commands with: pip install 'sfworkflow[service]'",
            file=sys.stderr,
        )
        return ExitCode.USAGE
    args = build_parser().parse_args(argv)  # a usage error: usage and the error on stderr, exit 2 (argparse)
    if args.command == "completion":  # needs no settings: it may be run before any are set
        try:
            print(completion_script(args.shell), end="")
        except ImportError:
            print("sfworkflow completion: shtab is missing; pip install 'sfworkflow[service]'", file=sys.stderr)
            return ExitCode.FAILED
        return ExitCode.OK
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"sfworkflow: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    from sfworkflow.runtime import logs

    logs.configure(settings.log_level, settings.log_format)
    if args.command not in SERVICE_COMMANDS:
        _quiet_drivers()
    log_unknown_variables()  # a warning per SFWORKFLOW_* variable sfworkflow does not read (a typo?)
    try:
        return _run(COMMANDS[args.command](settings, args), settings)
    except UsageError as exc:
        print(f"sfworkflow {args.command}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except SfworkflowError as exc:
        print(f"sfworkflow: {exc}", file=sys.stderr)
        return ExitCode.FAILED
    except KeyboardInterrupt:
        print(f"sfworkflow {args.command}: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:  # stdout's reader went away (`sfworkflow stuck | head -1`): nothing left to say
        silence_stdout()
        return ExitCode.FAILED
    except Exception as exc:
        line = connection_trouble(exc, settings)
        if line is not None:
            print(line, file=sys.stderr)
            return ExitCode.FAILED
        return unexpected(args.command, exc)


def unexpected(command: str, exc: Exception) -> int:
    """An error no code path expected (a bug): one line on stderr, the traceback in the log. The service's logs
    are where its operators look, so `run` and `demo` log it as an error; an operator command logs it at debug."""
    import structlog

    log = structlog.get_logger("sfworkflow.cli")
    level = log.error if command in SERVICE_COMMANDS else log.debug
    level("unexpected_error", command=command, exc_info=exc)
    hint = "" if command in SERVICE_COMMANDS else "; SFWORKFLOW_LOG_LEVEL=debug logs its traceback"
    text = " ".join(str(exc).split())[:300]
    what = f"unexpected error ({type(exc).__name__}: {text})"
    print(f"sfworkflow {command}: {what}; this is a bug, please report it{hint}", file=sys.stderr)
    return ExitCode.SOFTWARE


# What went wrong connecting, with what to do; {what}: PostgreSQL or RabbitMQ, {variable}: its setting.
UNREACHABLE = "cannot reach {what} at {url} ({error}); is it running, and is {variable} right?"
LOGIN_REFUSED = "{what} at {url} refused the login ({error}); check the user and password in {variable}"
NO_DATABASE = (
    "{what} at {url} has no such database ({error}); run `sfworkflow migrate` to create it, or check {variable}"
)
NOT_MIGRATED = (
    "{what} at {url} has no sfworkflow tables ({error}: {detail}); run `sfworkflow migrate`, or check {variable}"
)
REFUSED = "{what} at {url} refused the operation ({error}: {detail}); its log says more, and nothing was lost"


def connection_trouble(exc: BaseException, settings: Settings) -> str | None:
    """One line saying which dependency cannot be used and why, when `exc` (or what caused it) is a failure
    to reach or log in to PostgreSQL or RabbitMQ, a database without sfworkflow's tables, or an error either
    answered (a permission, a timeout); None for any other error (a bug). The URL's password is redacted."""
    for e in _causes(exc):
        found = _dependency(e)
        if found is not None:
            what, template = found
            url, variable = (
                (settings.database_url, "SFWORKFLOW_DATABASE_URL")
                if what == "PostgreSQL"
                else (settings.amqp_url, "SFWORKFLOW_AMQP_URL")
            )
            detail = " ".join(str(e).split())[:200]
            text = template.format(
                what=what, url=redact_url(url), error=type(e).__name__, detail=detail, variable=variable
            )
            return f"sfworkflow: {text}"
    return None


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception, what caused it (__cause__, __context__) and the members of exception groups."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(c for c in (e.__cause__, e.__context__) if c is not None)


def _dependency(e: BaseException) -> tuple[str, str] | None:
    """(PostgreSQL or RabbitMQ, what went wrong) when `e` says one cannot be reached, went away, refused the
    login or has no such database; else None."""
    import aio_pika
    import aiormq
    import asyncpg

    from sfworkflow import db

    if isinstance(e, aio_pika.exceptions.ProbableAuthenticationError):
        return "RabbitMQ", LOGIN_REFUSED
    if isinstance(e, aio_pika.exceptions.AMQPConnectionError):
        return "RabbitMQ", UNREACHABLE
    if isinstance(e, asyncpg.exceptions.InvalidAuthorizationSpecificationError):  # a wrong password or user
        return "PostgreSQL", LOGIN_REFUSED
    if isinstance(e, asyncpg.exceptions.InvalidCatalogNameError):
        return "PostgreSQL", NO_DATABASE
    if isinstance(e, asyncpg.exceptions.UndefinedTableError | asyncpg.exceptions.InvalidSchemaNameError):
        return "PostgreSQL", NOT_MIGRATED
    if isinstance(e, asyncpg.PostgresError | asyncpg.InterfaceError):
        if db.is_connection_error(e):
            return "PostgreSQL", UNREACHABLE
        sqlstate = str(getattr(e, "sqlstate", "") or "")
        if sqlstate.startswith("42") and not isinstance(e, asyncpg.exceptions.InsufficientPrivilegeError):
            return None  # SQL sfworkflow wrote that PostgreSQL cannot run (a column, a syntax): a bug
        return "PostgreSQL", REFUSED  # a permission, a statement timeout, a read-only replica, out of resources
    if isinstance(e, aiormq.exceptions.AMQPError):
        return "RabbitMQ", REFUSED
    if isinstance(e, OSError):  # refused, unreachable, no such host, timed out: whose driver was connecting?
        driver = _driver_of(e)
        return None if driver is None else (driver, UNREACHABLE)
    return None


def _driver_of(e: BaseException) -> str | None:
    """The dependency whose driver (asyncpg; aiormq, aio_pika) the traceback of `e` went through last."""
    found, tb = None, e.__traceback__
    while tb is not None:
        package = str(tb.tb_frame.f_globals.get("__name__", "")).partition(".")[0]
        found = DRIVERS.get(package, found)
        tb = tb.tb_next
    return found


DRIVERS = {"asyncpg": "PostgreSQL", "aiormq": "RabbitMQ", "aio_pika": "RabbitMQ", "pamqp": "RabbitMQ"}
