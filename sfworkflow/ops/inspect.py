"""`sfworkflow inspect TENANT/WORKFLOW/ENTITY`: one instance with its history, timers, outbox and parked events."""

from __future__ import annotations

import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from sfworkflow import db
from sfworkflow.db import operations
from sfworkflow.errors import UsageError
from sfworkflow.settings import Settings


async def load_instance(conn: asyncpg.Connection, tenant: str, workflow: str, entity: str) -> dict[str, Any] | None:
    row = await operations.instance_by_key(conn, tenant.lower(), workflow, entity)
    if row is None:
        parked = await operations.parked_of_key(conn, tenant.lower(), workflow, entity)
        if not parked:
            return None
        return {"instance": None, "parked": [dict(r) for r in parked]}
    iid = row["id"]
    history = await operations.history_of_instance(conn, iid)
    timers = await operations.timers_of_instance(conn, iid)
    outbox = await operations.outbox_of_instance(conn, iid)
    parked = await operations.parked_of_key(conn, row["tenant_id"], workflow, entity)
    return {
        "instance": {k: row[k] for k in row.keys()},
        "history": [dict(r) for r in history],
        "timers": [dict(r) for r in timers],
        "outbox": [{**{k: r[k] for k in r.keys() if k != "body"}, "body": orjson.loads(r["body"])} for r in outbox],
        "parked": [dict(r) for r in parked],
    }


async def inspect_instance(settings: Settings, ref: str, as_json: bool = False) -> int:
    parts = ref.split("/")
    if len(parts) != 3 or not all(parts):
        raise UsageError(f"{ref!r}: give the instance as TENANT/WORKFLOW/ENTITY")
    try:
        uuid.UUID(parts[0])
    except ValueError:
        raise UsageError(f"{ref!r}: {parts[0]!r} is not a tenant id (a UUID)") from None
    conn = await asyncpg.connect(settings.database_url)
    await db.init_connection(conn)
    try:
        found = await load_instance(conn, *parts)
    finally:
        await conn.close()
    if found is None:
        print(
            f"sfworkflow inspect: no instance {ref} and no parked event for it; check the tenant, workflow and "
            "entity (`sfworkflow stuck` lists the stuck instances)",
            file=sys.stderr,
        )
        return 1
    if as_json:
        print(orjson.dumps(found, default=str, option=orjson.OPT_INDENT_2).decode())
        return 0
    inst = found["instance"]
    if inst is None:
        print(f"{ref}: no instance yet; parked events waiting for it:")
    else:
        print(
            f"{ref}  state={inst['state']}  version={inst['version']}  definition=v{inst['definition_version']}"
            f"  terminal={inst['terminal']}  updated={inst['updated_at']:%Y-%m-%d %H:%M:%S}"
            f"  trace={inst.get('trace_id') or '-'}"
        )
        print("context: " + orjson.dumps(inst["context"]).decode())
        print("history:")
        for h in found["history"]:
            detail = orjson.dumps(h["detail"]).decode() if h["detail"] else ""
            print(
                f"  {h['created_at']:%H:%M:%S.%f}  #{h['seq']:<3} {h['outcome']:<10} {h['event_type']:<28} "
                f"{h['from_state'] or '':>12} -> {h['to_state'] or '':<12} {detail}"
            )
        print("timers:" + ("" if found["timers"] else " none"))
        for t in found["timers"]:
            print(f"  {t['name']:<12} due {t['due_at']:%Y-%m-%d %H:%M:%S}")
        print("outbox:")
        capped = {  # command id -> the daily cap that moved it to a later day
            h["detail"]["command_id"]: h["detail"].get("daily_cap")
            for h in found["history"]
            if h["outcome"] == "deferred" and h["detail"] and h["detail"].get("cause") == "daily_cap"
        }
        for o in found["outbox"]:
            if o["published_at"]:
                status = f"published {o['published_at']:%H:%M:%S}"
            elif o.get("failed_at"):
                status = (
                    f"FAILED, given up after {o['publish_attempts']} attempts ({o['last_error']}); "
                    f"republish: sfworkflow outbox republish --id {o['id']}"
                )
            elif o.get("queued"):
                limit = str(o["gate_key"]).split("|")[0]
                status = f"QUEUED for a slot of {limit} ({o['queued_ahead']} of the key's commands ahead)"
            elif o.get("deferred_until") and o["deferred_until"] > datetime.now(UTC):
                status = f"DEFERRED until {o['deferred_until']:%Y-%m-%d %H:%M:%S.%f} UTC by {o['deferred_by']}"
                if str(o["message_id"]) in capped:
                    status += f" (its daily cap of {capped[str(o['message_id'])]} reached: the next UTC day's)"
            else:
                status = f"PENDING (attempts {o['publish_attempts']}, {o['last_error'] or 'not tried yet'})"
                if o.get("deferred_until"):
                    status += f"; deferred until {o['deferred_until']:%H:%M:%S.%f} by {o['deferred_by']}"
            if o["published_at"] and o.get("deferred_until"):
                status += f" (deferred by {o['deferred_by']} until {o['deferred_until']:%H:%M:%S.%f})"
            if o.get("granted_at"):
                status += f" (slot of {str(o['gate_key']).split('|')[0]} granted {o['granted_at']:%H:%M:%S.%f})"
            attempt = o["body"].get("attempt")
            print(
                f"  {o['kind']:<12} {o['routing_key']:<32} {status}"
                + (f"  attempt={attempt} key={o['body'].get('idempotency_key')}" if attempt else "")
            )
    print("parked:" + ("" if found["parked"] else " none"))
    for p in found["parked"]:
        print(f"  {p['event_type']:<28} {p['reason']}  deadline {p['deadline']:%Y-%m-%d %H:%M:%S}")
    return 0
