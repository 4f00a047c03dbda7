"""The chaos suite's handles on the servers past one machine: the three-node RabbitMQ cluster of
scripts/rabbitmq-cluster and the PostgreSQL primary with its synchronous standby of scripts/pg-standby.

Each call runs the script and returns what it printed (its last line, for the ones that print a URL); a script
that fails raises with its output, so a scenario never goes on against a half-started cluster."""

from __future__ import annotations

import base64
import json
import subprocess
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
RABBIT = ROOT / "scripts" / "rabbitmq-cluster"
PG = ROOT / "scripts" / "pg-standby"
MANAGEMENT_PORTS = (15681, 15682, 15683)  # the cluster's nodes 1-3 (scripts/rabbitmq-cluster)


def _run(script: Path, *args: str, timeout: float = 300) -> str:
    run = subprocess.run([str(script), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if run.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} exited {run.returncode}:\n{run.stdout}\n{run.stderr}")
    return run.stdout.strip()


def rabbit(*args: str, timeout: float = 300) -> str:
    return _run(RABBIT, *args, timeout=timeout)


def pg(*args: str, timeout: float = 300) -> str:
    return _run(PG, *args, timeout=timeout)


def teardown(*, rabbit: bool = True, pg: bool = True) -> None:
    """Stop the cluster and the standby pair and delete their data; each stop is tried even when the other fails."""
    failures = []
    for wanted, script in ((rabbit, RABBIT), (pg, PG)):
        if wanted:
            try:
                _run(script, "stop")
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                failures.append(str(exc))
    if failures:
        raise RuntimeError("teardown failed: " + "; ".join(failures))


def last_line(text: str) -> str:
    return text.splitlines()[-1].strip() if text else ""


def cluster_urls(vhost: str) -> list[str]:
    """Start the cluster (a no-op when it runs), make `vhost` afresh on it; each node's URL to that vhost."""
    urls = last_line(rabbit("start", timeout=600)).split(",")
    rabbit("vhost", vhost)
    return [f"{u.rstrip('/')}/{quote(vhost, safe='')}" for u in urls]


def _api(path: str) -> Any:
    """GET from the management API of the first node that answers."""
    auth = base64.b64encode(b"guest:guest").decode()
    failure: Exception | None = None
    for port in MANAGEMENT_PORTS:
        url = f"http://127.0.0.1:{port}/api/{path}"
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                return json.loads(r.read())
        except OSError as exc:
            failure = exc
    raise RuntimeError(f"no node of the cluster answers its management API: {failure}")


def busiest_queue_leader(vhost: str, prefix: str) -> tuple[str, int]:
    """The queue named `prefix`… that has taken the most messages in `vhost`, and the index (1-3) of the node
    leading it: the node to kill to hit the load."""
    queues = [q for q in _api(f"queues/{quote(vhost, safe='')}") if q["name"].startswith(prefix)]
    if not queues:
        raise RuntimeError(f"no queue {prefix}* in vhost {vhost}")
    busiest = max(queues, key=lambda q: (q.get("message_stats") or {}).get("publish", 0))
    leader = busiest.get("leader") or busiest["node"]
    return busiest["name"], int(leader.split("@")[0].rsplit("-", 1)[1])


def queue_members(vhost: str, name: str) -> list[str]:
    """The nodes holding a replica of quorum queue `name`."""
    return sorted(_api(f"queues/{quote(vhost, safe='')}/{quote(name, safe='')}").get("members") or [])
