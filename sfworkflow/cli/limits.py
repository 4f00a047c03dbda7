"""`sfworkflow limits list|show|set|unset`: the rate and concurrency limits on commands, and a tenant's own ones.

The rate in force for a tenant is its override (set here), else the deployment's (SFWORKFLOW_RATE_LIMITS), else the
definition's. An override applies from the next batch on, on every replica; commands already deferred keep their
slots. See ops/limits.py.
"""

from __future__ import annotations

import argparse
import getpass
from typing import Any

import orjson

from sfworkflow.cli.exit_codes import ExitCode
from sfworkflow.core.engine import Engine
from sfworkflow.core.limits import parse_overrides
from sfworkflow.ops import limits
from sfworkflow.ops.dead_letters import connect_database
from sfworkflow.settings import Settings
from sfworkflow.workflows import DEFINITIONS


def register(sub: Any) -> dict[str, Any]:
    p = sub.add_parser(
        "limits",
        help="rate and concurrency limits on commands, and a tenant's own ones",
        description="Rate and concurrency limits on outgoing commands (README, 'Rate limits on commands', "
        "'Concurrency limits'). The rate (and daily cap) in force for a tenant is its override (`limits set`), else "
        "SFWORKFLOW_RATE_LIMITS, else the definition's; its slots are its override, else the definition's. An "
        "override applies from the next batch (a rate) or grant round (slots) on, on every replica; commands already "
        "deferred keep their slots.",
    )
    actions = p.add_subparsers(dest="limits_command", required=True, metavar="list|show|set|unset")
    ls = actions.add_parser(
        "list",
        help="declared limits, the rates in force, and every tenant's override",
        description="Every rate limit the definitions declare, the rate this deployment enforces (the definition's "
        "or SFWORKFLOW_RATE_LIMITS), and every tenant's override. Changes nothing.",
    )
    ls.add_argument("--json", action="store_true", help="print JSON instead of text")
    show = actions.add_parser(
        "show",
        help="one tenant: the rate in force per limit, its buckets and deferred commands",
        description="For one tenant, each limit's rate in force and where it comes from, how far ahead each of its "
        "keys is booked, and how many of its commands wait deferred (and until when). Changes nothing.",
    )
    show.add_argument("tenant", help="tenant id (a UUID)")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    st = actions.add_parser(
        "set",
        help="give a tenant its own rate, daily cap or slots for a limit",
        description="Give TENANT its own rate and/or daily cap for a rate limit (e.g. sequence.send_step/per_sender: "
        "--per-s, --burst, --daily-cap; what it does not name stays: the tenant's own, else the one in force) or its "
        "own slots for a concurrency limit (e.g. agent.run_task/per_tenant: --slots), replacing an "
        "earlier override. Applies from the next batch (or grant round) on, on every replica. Commands already "
        "deferred keep their slots; lowering slots takes none back from the runs in flight.",
    )
    st.add_argument("tenant", help="tenant id (a UUID)")
    st.add_argument("limit", help="a declared limit, e.g. sequence.send_step/per_sender (`limits list`)")
    st.add_argument("--per-s", type=float, help="a rate limit: commands a second (> 0)")
    st.add_argument(
        "--burst", type=int, help="a rate limit: commands at once after a quiet spell (default: the rate in force's)"
    )
    st.add_argument(
        "--daily-cap", type=int, help="a rate limit: commands a UTC day per key at most (with or without a rate)"
    )
    st.add_argument("--slots", type=int, help="a concurrency limit: commands in flight at once per key")
    st.add_argument("--reason", required=True, help="why (kept with the override)")
    st.add_argument("--by", default=None, help="who (default: the login name)")
    st.add_argument("--json", action="store_true", help="print JSON instead of text")
    un = actions.add_parser(
        "unset",
        help="remove a tenant's override: back to the deployment's rate",
        description="Remove TENANT's override of LIMIT: it goes back to the deployment's rate from the next batch on. "
        "Exits 1 when it had none.",
    )
    un.add_argument("tenant", help="tenant id (a UUID)")
    un.add_argument("limit", help="a declared limit, e.g. sequence.send_step/per_sender")
    return {"limits": run}


def engine_of(settings: Settings) -> Engine:
    return Engine(DEFINITIONS, parse_overrides(settings.rate_limits))


async def run(settings: Settings, args: argparse.Namespace) -> int:
    engine = engine_of(settings)
    conn = await connect_database(settings)
    try:
        if args.limits_command == "list":
            found = {
                "limits": [d.as_json() for d in limits.declared(engine)],
                "concurrency": limits.declared_concurrency(engine),
                "overrides": await limits.overrides(conn),
            }
            _print(found, args.json, _list_text)
            return 0
        if args.limits_command == "show":
            _print(await limits.tenant_view(conn, engine, args.tenant), args.json, _show_text)
            return 0
        if args.limits_command == "set":
            by = args.by or getpass.getuser()
            async with conn.transaction():
                row = await limits.set_override(
                    conn,
                    engine,
                    args.tenant,
                    args.limit,
                    args.per_s,
                    args.burst,
                    args.reason,
                    by,
                    args.slots,
                    args.daily_cap,
                )
            _print(row, args.json, _set_text)
            return 0
        removed = await limits.unset_override(conn, engine, args.tenant, args.limit)
        if removed is None:
            print(f"tenant {args.tenant} has no override of {args.limit}: nothing to remove")
            return ExitCode.FAILED
        print(f"removed: {args.limit} for tenant {removed['tenant']} was {_own(removed)}; it follows the "
              "deployment's from the next batch on")  # fmt: skip
        return 0
    finally:
        await conn.close()


def _print(found: dict[str, Any], as_json: bool, text: Any) -> None:
    if as_json:
        print(orjson.dumps(found, default=str, option=orjson.OPT_INDENT_2).decode())
    else:
        text(found)


def _own(o: dict[str, Any]) -> str:
    if o.get("slots") is not None:
        return f"{o['slots']} slots"
    parts = [] if o["per_s"] is None else [f"{o['per_s']:g}/s burst {o['burst']}"]
    return ", ".join(parts + ([] if o.get("daily_cap") is None else [f"{o['daily_cap']} a day"]))


def _rate(r: dict[str, Any] | None) -> str:
    if r is None:
        return "off"
    return f"{r['per_s']:g}/s burst {r['burst']}" + ("" if r.get("daily_cap") is None else f", {r['daily_cap']}/day")


def _list_text(found: dict[str, Any]) -> None:
    print("declared limits:" + ("" if found["limits"] else " none"))
    for d in found["limits"]:
        print(f"  {d['limit']:<40} {_rate(d['in_force']):<22} ({d['source']})  {d['description']}")
    for c in found.get("concurrency", []):
        print(f"  {c['limit']:<40} {str(c['slots']) + ' in flight':<22} (definition)  {c['description']}")
    print("tenant overrides:" + ("" if found["overrides"] else " none"))
    for o in found["overrides"]:
        print(f"  {o['tenant']}  {o['limit']:<40} {_own(o)}  "
              f"by {o['updated_by']} at {o['updated_at']:%Y-%m-%d %H:%M:%S}: {o['reason']}")  # fmt: skip


def _show_text(found: dict[str, Any]) -> None:
    print(f"tenant {found['tenant']}")
    for lim in found["limits"]:
        print(f"  {lim['limit']:<40} {_rate(lim['rate']):<22} ({lim['source']})")
        if lim["deferred"]:
            print(f"    {lim['deferred']} command(s) deferred, the last until {lim['deferred_until']:%H:%M:%S.%f}")
        for k in lim["keys"]:
            ahead = f"booked {k['booked_ahead_s']:g} s ahead" if k["booked_ahead_s"] else "idle"
            if "day" in k:
                ahead += f"; {k['booked_that_day']} booked on {k['day']} (UTC)"
            print(f"    key {k['key']:<36} {ahead}")
    for c in found.get("concurrency", []):
        print(f"  {c['limit']:<40} {str(c['slots']) + ' in flight':<22} ({c['source']})")
        print(f"    {c['held']} held, {c['waiting']} queued for a slot")


def _set_text(row: dict[str, Any]) -> None:
    print(f"set: {row['limit']} for tenant {row['tenant']} is {_own(row)} from the next batch on "
          f"(by {row['updated_by']}: {row['reason']})")  # fmt: skip
    if row.get("note"):
        print(f"note: {row['note']}")
