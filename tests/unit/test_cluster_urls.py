"""Several nodes in one setting: a comma-separated SFWORKFLOW_AMQP_URL (a RabbitMQ cluster) and PostgreSQL's multi-host
URL (a primary and its standby): parsed, validated and redacted node by node."""

from __future__ import annotations

import pytest

from sfworkflow.client import amqp
from sfworkflow.client.urls import split_urls
from sfworkflow.settings import Settings, SettingsError, redact_url

NODES = "amqp://guest:pw@mq-1:5672/sf,amqp://guest:pw@mq-2:5672/sf, amqp://guest:pw@mq-3:5672/sf"
PG_HA = "postgresql://app:pw@pg-a:5432,pg-b:5432/wf?target_session_attrs=read-write"


def test_a_comma_separated_list_names_each_node_in_order() -> None:
    assert split_urls(NODES) == [f"amqp://guest:pw@mq-{i}:5672/sf" for i in (1, 2, 3)]


def test_one_url_is_a_list_of_one() -> None:
    assert split_urls(" amqp://mq:5672/ ") == ["amqp://mq:5672/"]


def test_a_comma_inside_a_url_does_not_split_it() -> None:
    # PostgreSQL's host list, or a password with an unencoded comma: no `scheme://` follows the comma.
    assert split_urls(PG_HA) == [PG_HA]
    assert split_urls("amqp://u:a,b@mq:5672/") == ["amqp://u:a,b@mq:5672/"]


@pytest.mark.parametrize("empty", ["", " , ", ","])
def test_no_url_at_all_is_an_error(empty: str) -> None:
    with pytest.raises(ValueError, match="no AMQP URL given"):
        split_urls(empty)


def test_the_amqp_setting_takes_a_cluster_s_nodes() -> None:
    assert Settings.from_env({"SFWORKFLOW_AMQP_URL": NODES}).amqp_url == NODES


def test_every_node_of_the_list_is_validated_and_none_shows_its_password() -> None:
    bad = "amqp://guest:hunter2@mq-1:5672/,http://guest:hunter2@mq-2:5672/"
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"SFWORKFLOW_AMQP_URL": bad})
    message = str(caught.value)
    assert "hunter2" not in message and "several separated by commas" in message


def test_redaction_hides_every_node_s_password() -> None:
    assert redact_url(NODES) == ",".join(f"amqp://guest:***@mq-{i}:5672/sf" for i in (1, 2, 3))


def test_the_database_setting_takes_a_multi_host_url() -> None:
    assert Settings.from_env({"SFWORKFLOW_DATABASE_URL": PG_HA}).database_url == PG_HA
    assert redact_url(PG_HA) == "postgresql://app:***@pg-a:5432,pg-b:5432/wf?target_session_attrs=read-write"


def test_the_installed_aio_pika_reconnects_through_the_attempt_failover_wraps() -> None:
    """FailoverConnection overrides aio-pika's private one-attempt method: its reconnect loop must call it, or a
    cluster's node list would silently stay on one node (an aio-pika upgrade that renames it fails here)."""
    assert amqp.can_fail_over()


@pytest.mark.parametrize(
    ("url", "secrets"),
    [
        ("amqp://u:hunter2@h1:5672,h2:5672/", ["hunter2"]),  # hosts listed PostgreSQL's way: one URL per node
        ("amqp://u:hunter2@h1/,u:s3cret@h2/", ["hunter2", "s3cret"]),  # the second node without its scheme
        ("amqp://u:abc,amqp://def@h/", ["abc", "def"]),  # a password with ',amqp://' in it, not %-encoded
    ],
)
def test_a_malformed_node_list_is_refused_without_any_password(url: str, secrets: list[str]) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"SFWORKFLOW_AMQP_URL": url})
    assert not [s for s in secrets if s in str(caught.value)]


def test_an_empty_host_in_postgresql_s_list_is_refused() -> None:
    with pytest.raises(SettingsError):
        Settings.from_env({"SFWORKFLOW_DATABASE_URL": "postgresql://app@pg-a:5432,/wf"})


@pytest.mark.parametrize("var", ["SFWORKFLOW_AMQP_URL", "SFWORKFLOW_DATABASE_URL"])
def test_a_value_of_only_commas_is_a_settings_error(var: str) -> None:
    with pytest.raises(SettingsError):
        Settings.from_env({var: " , "})
