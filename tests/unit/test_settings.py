"""`Settings.from_env` (given an explicit env mapping) and `redact_url`."""

from __future__ import annotations

import dataclasses

import pytest

from sfworkflow.settings import Settings, SettingsError, redact_url


def test_empty_env_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_env_values_are_read_and_converted() -> None:
    s = Settings.from_env(
        {
            "SFWORKFLOW_DATABASE_URL": "postgresql://app@db:5432/wf",
            "SFWORKFLOW_AMQP_URL": "amqp://u:p@mq:5672/vh",
            "SFWORKFLOW_HTTP_PORT": "9090",
            "SFWORKFLOW_PREFETCH": "512",
            "SFWORKFLOW_BATCH_SIZE": "64",
            "SFWORKFLOW_BATCH_LINGER_MS": "0.5",
            "SFWORKFLOW_PARK_TIMEOUT_S": "120",
            "SFWORKFLOW_QUEUE_TYPE": "classic",
            "SFWORKFLOW_LOG_LEVEL": "debug",
            "SFWORKFLOW_USE_UVLOOP": "false",
        }
    )
    assert (s.database_url, s.amqp_url) == ("postgresql://app@db:5432/wf", "amqp://u:p@mq:5672/vh")
    assert s.http_port == 9090 and isinstance(s.http_port, int)
    assert (s.prefetch, s.batch_size) == (512, 64)
    assert s.batch_linger_ms == 0.5 and isinstance(s.batch_linger_ms, float)
    assert s.park_timeout_s == 120.0 and isinstance(s.park_timeout_s, float)
    assert (s.queue_type, s.log_level, s.use_uvloop) == ("classic", "debug", False)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("off", False),
        ("nonsense", False),
    ],
)
def test_bool_conversion(raw: str, expected: bool) -> None:
    assert Settings.from_env({"SFWORKFLOW_USE_UVLOOP": raw}).use_uvloop is expected


def test_empty_values_and_other_prefixes_are_ignored() -> None:
    s = Settings.from_env({"SFWORKFLOW_HTTP_PORT": "", "HTTP_PORT": "1", "sfworkflow_prefetch": "3"})
    assert s == Settings()


def test_overrides_win_over_env() -> None:
    s = Settings.from_env({"SFWORKFLOW_HTTP_PORT": "9090"}, http_port=7070)
    assert s.http_port == 7070


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("HTTP_PORT", "eighty"),
        ("PREFETCH", "1.5"),
        ("POOL_SIZE", ""),
        ("BATCH_LINGER_MS", "fast"),
        ("RELAY_BATCH", "10k"),
    ],
)
def test_bad_numbers_are_rejected(var: str, raw: str) -> None:
    if raw == "":
        assert Settings.from_env({f"SFWORKFLOW_{var}": raw}) == Settings()  # empty means unset
        return
    with pytest.raises(SettingsError) as exc:
        Settings.from_env({f"SFWORKFLOW_{var}": raw})
    assert f"SFWORKFLOW_{var}" in str(exc.value) and raw in str(exc.value)


@pytest.mark.parametrize("queue_type", ["lazy", "QUORUM", "stream", "x"])
def test_bad_queue_type_is_rejected(queue_type: str) -> None:
    with pytest.raises(SettingsError, match="SFWORKFLOW_QUEUE_TYPE"):
        Settings.from_env({"SFWORKFLOW_QUEUE_TYPE": queue_type})


@pytest.mark.parametrize(
    "var", ["PREFETCH", "CONSUMERS", "BATCH_SIZE", "POOL_SIZE", "MAX_MESSAGE_BYTES", "RELAY_BATCH"]
)
def test_counts_must_be_positive(var: str) -> None:
    with pytest.raises(SettingsError, match=f"SFWORKFLOW_{var} must be at least 1"):
        Settings.from_env({f"SFWORKFLOW_{var}": "0"})


def test_batch_size_may_not_exceed_prefetch() -> None:
    with pytest.raises(SettingsError, match="BATCH_SIZE"):
        Settings.from_env({"SFWORKFLOW_PREFETCH": "10", "SFWORKFLOW_BATCH_SIZE": "11"})
    assert Settings.from_env({"SFWORKFLOW_PREFETCH": "10", "SFWORKFLOW_BATCH_SIZE": "10"}).batch_size == 10


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().http_port = 1  # type: ignore[misc]


# ---- redact_url ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://u:secret@h/", "amqp://u:***@h/"),
        ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:***@127.0.0.1:5672/"),
        (
            "postgresql://app:s3cr%40t@db:5432/wf?sslmode=require",
            "postgresql://app:***@db:5432/wf?sslmode=require",
        ),
        ("amqp://:secret@h/vh", "amqp://:***@h/vh"),
    ],
)
def test_redact_url_hides_the_password(url: str, expected: str) -> None:
    out = redact_url(url)
    assert out == expected
    password = url.split("://", 1)[1].rsplit("@", 1)[0].split(":", 1)[1]
    assert f":{password}@" not in out
    assert "***" in out


@pytest.mark.parametrize(
    "url",
    ["amqp://h/", "postgresql://postgres@127.0.0.1:5432/sfworkflow", "amqp://guest@h:5672/vh", "not a url"],
)
def test_redact_url_leaves_password_less_urls_alone(url: str) -> None:
    assert redact_url(url) == url


def test_redact_url_on_an_unparseable_url() -> None:
    assert redact_url("amqp://[::1") == "<unparseable url>"


def test_tls_urls_pass_through_untouched() -> None:
    """TLS is the drivers' business: sfworkflow hands `amqps://` and `?sslmode=require` on as they are."""
    env = {
        "SFWORKFLOW_DATABASE_URL": "postgresql://svc:pw@db.internal:5432/sfworkflow?sslmode=require",
        "SFWORKFLOW_AMQP_URL": "amqps://svc:pw@mq.internal:5671/prod?cafile=/etc/ssl/ca.pem",
    }
    s = Settings.from_env(env)
    assert s.database_url == env["SFWORKFLOW_DATABASE_URL"] and s.amqp_url == env["SFWORKFLOW_AMQP_URL"]
    assert redact_url(s.database_url) == "postgresql://svc:***@db.internal:5432/sfworkflow?sslmode=require"
    assert redact_url(s.amqp_url) == "amqps://svc:***@mq.internal:5671/prod?cafile=/etc/ssl/ca.pem"


def test_the_image_runs_as_a_non_root_user() -> None:
    """No Docker engine here to build it: the Dockerfile itself must switch to an unprivileged user."""
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text().splitlines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), users
    assert any(line.startswith("ENTRYPOINT") and "sfworkflow" in line for line in lines)
    assert 'CMD ["run"]' in lines
