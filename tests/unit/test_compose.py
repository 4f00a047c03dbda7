"""compose.yaml against the Compose Specification's JSON Schema (tests/data/compose-spec.json, vendored: no Docker
engine or compose plugin here to run `docker compose config`), and what the schema cannot say about it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return doc


def test_compose_yaml_is_valid_against_the_compose_specification() -> None:
    schema = orjson.loads((ROOT / "tests" / "data" / "compose-spec.json").read_bytes())
    errors = [
        f"{'/'.join(map(str, e.instance_path))}: {e.message}"
        for e in jsonschema_rs.validator_for(schema).iter_errors(_compose())
    ]
    assert errors == []


def test_every_service_has_a_health_check_and_waits_for_what_it_needs() -> None:
    services = _compose()["services"]
    assert set(services) == {"postgres", "rabbitmq", "sfworkflow", "worker"}
    for name, service in services.items():
        assert "test" in service.get("healthcheck", {}), name
    assert services["sfworkflow"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "rabbitmq": {"condition": "service_healthy"},
    }
    assert services["worker"]["depends_on"] == {"sfworkflow": {"condition": "service_healthy"}}
    assert services["rabbitmq"]["image"].endswith("-management")


def test_the_service_and_the_worker_are_built_from_the_dockerfile_s_stages_and_read_known_settings() -> None:
    from sfworkflow.settings import Settings

    services = _compose()["services"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "AS demo" in dockerfile and services["worker"]["build"]["target"] == "demo"
    assert "target" not in services["sfworkflow"]["build"]  # the default target: the service alone
    known = {f"SFWORKFLOW_{name.upper()}" for name in Settings.__dataclass_fields__}
    for name in ("sfworkflow", "worker"):
        assert set(services[name]["environment"]) <= known, name
    assert services["sfworkflow"]["command"] == ["run"]
    assert services["worker"]["command"][0] == "worker"


def test_rabbitmq_gets_the_consistent_hash_exchange_plugin() -> None:
    """The service refuses to start on a broker without it (runtime/declare.py): the compose broker enables it."""
    volumes = _compose()["services"]["rabbitmq"]["volumes"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in volumes if v.startswith("./")}
    plugins = (ROOT / mounts["/etc/rabbitmq/enabled_plugins"]).read_text()
    assert "rabbitmq_consistent_hash_exchange" in plugins and "rabbitmq_management" in plugins
    assert plugins.strip().startswith("[") and plugins.strip().endswith("].")  # an Erlang term, as RabbitMQ reads it
