"""`Settings.from_env` (given an explicit env mapping), its validation, `unknown_variables` and `redact_url`."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest

from sfworkflow import settings as settings_module
from sfworkflow.settings import Settings, SettingsError, redact_url

REPO = Path(__file__).resolve().parents[2]


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
        ("Off", False),
        ("YES", True),
        ("On ", True),
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
    with pytest.raises(SettingsError, match=f"SFWORKFLOW_{var}='0': use a whole number, at least 1"):
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


# ---- every setting is validated ---------------------------------------------------------------------------
def _error(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as exc:
        Settings.from_env(env)
    return str(exc.value)


@pytest.mark.parametrize("raw", ["flase", "ture", "2", "-1", "y", "n", "t", "enabled", "disabled", "none"])
def test_a_boolean_accepts_only_the_documented_words(raw: str) -> None:
    message = _error({"SFWORKFLOW_USE_UVLOOP": raw})
    assert message.startswith(f"SFWORKFLOW_USE_UVLOOP={raw!r}: ")
    assert "true, false, 1, 0, yes, no, on, off" in message


@pytest.mark.parametrize("raw", ["99999", "65536", "-1", "80.0", "1_000", "1e3", " "])
def test_the_http_port_is_a_whole_number_from_0_to_65535(raw: str) -> None:
    message = _error({"SFWORKFLOW_HTTP_PORT": raw})
    assert message.startswith(f"SFWORKFLOW_HTTP_PORT={raw!r}: ") and "0 to 65535" in message


@pytest.mark.parametrize("raw", ["0", "1", "65535"])
def test_the_http_port_bounds_are_accepted(raw: str) -> None:
    assert Settings.from_env({"SFWORKFLOW_HTTP_PORT": raw}).http_port == int(raw)


@pytest.mark.parametrize("raw", ["1.5", "2.0", "1_000", "1e3", "0x10", "٣"])
def test_integers_are_plain_whole_numbers(raw: str) -> None:
    message = _error({"SFWORKFLOW_CONSUMERS": raw})
    assert message.startswith(f"SFWORKFLOW_CONSUMERS={raw!r}: use a whole number")


def test_prefetch_fits_an_amqp_prefetch_count() -> None:
    assert "65535" in _error({"SFWORKFLOW_PREFETCH": "65536", "SFWORKFLOW_BATCH_SIZE": "1"})
    assert Settings.from_env({"SFWORKFLOW_PREFETCH": "65535"}).prefetch == 65535


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "Infinity", "1_0", "fast", "1,5"])
@pytest.mark.parametrize(
    "var",
    ["BATCH_LINGER_MS", "PARK_TIMEOUT_S", "TIMER_POLL_MS", "RELAY_POLL_MS", "SHUTDOWN_TIMEOUT_S", "STUCK_AFTER_S"],
)
def test_durations_are_finite_numbers(var: str, raw: str) -> None:
    message = _error({f"SFWORKFLOW_{var}": raw})
    assert message.startswith(f"SFWORKFLOW_{var}={raw!r}: use a number of ")


@pytest.mark.parametrize(
    "var", ["PARK_TIMEOUT_S", "TIMER_POLL_MS", "RELAY_POLL_MS", "SHUTDOWN_TIMEOUT_S", "STUCK_AFTER_S"]
)
@pytest.mark.parametrize("raw", ["0", "-1", "-0.5"])
def test_timeouts_and_poll_intervals_must_be_positive(var: str, raw: str) -> None:
    message = _error({f"SFWORKFLOW_{var}": raw})
    assert message.startswith(f"SFWORKFLOW_{var}={raw!r}: ") and "above 0" in message


def test_the_batch_linger_may_be_0_but_not_negative() -> None:
    assert Settings.from_env({"SFWORKFLOW_BATCH_LINGER_MS": "0"}).batch_linger_ms == 0.0
    message = _error({"SFWORKFLOW_BATCH_LINGER_MS": "-1"})
    assert message.startswith("SFWORKFLOW_BATCH_LINGER_MS='-1': ") and "0 or more" in message


def test_durations_accept_decimals_and_exponents() -> None:
    s = Settings.from_env({"SFWORKFLOW_TIMER_POLL_MS": "2.5e2", "SFWORKFLOW_RELAY_POLL_MS": " .5 "})
    assert (s.timer_poll_ms, s.relay_poll_ms) == (250.0, 0.5)


@pytest.mark.parametrize("raw", ["verbose", "warn", "trace", "fatal", "notset", "10"])
def test_unknown_log_levels_are_rejected(raw: str) -> None:
    message = _error({"SFWORKFLOW_LOG_LEVEL": raw})
    assert message.startswith(f"SFWORKFLOW_LOG_LEVEL={raw!r}: ")
    assert "debug, info, warning, error, critical" in message


@pytest.mark.parametrize(("raw", "expected"), [("debug", "debug"), ("INFO", "info"), ("Critical", "critical")])
def test_log_levels_in_any_case(raw: str, expected: str) -> None:
    assert Settings.from_env({"SFWORKFLOW_LOG_LEVEL": raw}).log_level == expected


@pytest.mark.parametrize("raw", ["text", "plain", "jsonl", "pretty"])
def test_unknown_log_formats_are_rejected(raw: str) -> None:
    message = _error({"SFWORKFLOW_LOG_FORMAT": raw})
    assert message.startswith(f"SFWORKFLOW_LOG_FORMAT={raw!r}: ") and "json, console" in message


def test_log_formats_in_any_case() -> None:
    assert Settings.from_env({"SFWORKFLOW_LOG_FORMAT": "Console"}).log_format == "console"
    assert Settings.from_env({"SFWORKFLOW_LOG_FORMAT": "JSON"}).log_format == "json"


def test_the_queue_type_error_names_the_choices() -> None:
    message = _error({"SFWORKFLOW_QUEUE_TYPE": "lazy"})
    assert message.startswith("SFWORKFLOW_QUEUE_TYPE='lazy': ") and "quorum, classic" in message


@pytest.mark.parametrize(
    ("var", "url", "secret"),
    [
        ("DATABASE_URL", "mysql://app:hunter2@db:3306/wf", "hunter2"),
        ("DATABASE_URL", "db.internal:5432", None),
        ("DATABASE_URL", "postgresql://app:hunter2@db:99999/wf", "hunter2"),
        ("DATABASE_URL", "postgresql://app:hu#nter2@db:5432/wf", "nter2"),  # an unencoded '#' in the password
        ("AMQP_URL", "http://u:hunter2@mq:5672/", "hunter2"),
        ("AMQP_URL", "amqp://u:hunter2@mq:port/", "hunter2"),
    ],
)
def test_bad_urls_are_rejected_without_their_password(var: str, url: str, secret: str | None) -> None:
    message = _error({f"SFWORKFLOW_{var}": url})
    assert message.startswith(f"SFWORKFLOW_{var}={redact_url(url)!r}: use ")
    assert secret is None or secret not in message


def test_postgres_and_amqps_url_schemes_are_accepted() -> None:
    s = Settings.from_env({"SFWORKFLOW_DATABASE_URL": "postgres://app@db/wf", "SFWORKFLOW_AMQP_URL": "amqps://mq/"})
    assert (s.database_url, s.amqp_url) == ("postgres://app@db/wf", "amqps://mq/")


@pytest.mark.parametrize("token", ["s3cr3t-t0k3n", "fifteen-chars!!"])
def test_a_short_admin_token_is_refused_without_showing_it(token: str) -> None:
    message = _error({"SFWORKFLOW_ADMIN_TOKEN": token})
    assert message.startswith("SFWORKFLOW_ADMIN_TOKEN is too short") and "at least 16" in message
    assert token not in message and f"{len(token)} characters" in message


def test_check_validates_directly_constructed_settings_too() -> None:
    with pytest.raises(SettingsError, match=r"^SFWORKFLOW_HTTP_PORT=99999: "):
        Settings(http_port=99999).check()
    with pytest.raises(SettingsError, match=r"^SFWORKFLOW_USE_UVLOOP='yes': "):
        Settings(use_uvloop="yes").check()  # type: ignore[arg-type]
    with pytest.raises(SettingsError, match=r"^SFWORKFLOW_PARK_TIMEOUT_S=nan: "):
        Settings(park_timeout_s=float("nan")).check()
    with pytest.raises(SettingsError, match=r"^SFWORKFLOW_ADMIN_TOKEN is too short") as exc:
        Settings(admin_token="s3cr3t").check()
    assert "s3cr3t" not in str(exc.value)


def test_overrides_are_validated() -> None:
    with pytest.raises(SettingsError, match="SFWORKFLOW_RETENTION_DAYS"):
        Settings.from_env({}, retention_days=0)


def test_every_setting_has_a_rule() -> None:
    assert set(settings_module.RULES) == {f.name for f in dataclasses.fields(Settings)}


def test_the_defaults_and_what_the_tests_construct_pass_the_check() -> None:
    Settings().check()
    Settings(http_host="127.0.0.1", http_port=0, timer_poll_ms=50, relay_poll_ms=100, queue_type="classic").check()
    Settings(park_timeout_s=0.5, shutdown_timeout_s=2.0, consumers=1, max_message_bytes=1024).check()


# ---- retention: never shorter than the redelivery window -----------------------------------------------------
def test_the_redelivery_window_is_7_days_and_the_default_retention_covers_it() -> None:
    assert settings_module.REDELIVERY_WINDOW_DAYS == 7
    assert settings_module.MIN_RETENTION_DAYS == settings_module.REDELIVERY_WINDOW_DAYS
    assert settings_module.DEFAULT_RETENTION_DAYS >= settings_module.REDELIVERY_WINDOW_DAYS


@pytest.mark.parametrize("raw", ["0", "0.5", "1", "6", "6.99", "-14"])
def test_a_retention_shorter_than_the_redelivery_window_is_refused(raw: str) -> None:
    """SFWORKFLOW_RETENTION_DAYS=0 used to empty the dedupe inbox on every sweep: redeliveries applied twice."""
    message = _error({"SFWORKFLOW_RETENTION_DAYS": raw})
    assert message.startswith(f"SFWORKFLOW_RETENTION_DAYS={raw!r}: ")
    assert "at least 7" in message and "redelivery window" in message


@pytest.mark.parametrize("raw", ["7", "7.5", "14", "365", "36500"])
def test_a_retention_of_the_window_or_more_is_accepted(raw: str) -> None:
    assert Settings.from_env({"SFWORKFLOW_RETENTION_DAYS": raw}).retention_days == float(raw)


def test_a_retention_beyond_100_years_is_refused() -> None:
    assert "36500" in _error({"SFWORKFLOW_RETENTION_DAYS": "36501"})  # the sweep's interval arithmetic overflows


def test_the_park_timeout_may_not_outlast_the_retention() -> None:
    """A parked event's inbox row must outlive its parking, or a redelivery of it is not deduplicated."""
    week = 7 * 86400
    assert Settings.from_env({"SFWORKFLOW_PARK_TIMEOUT_S": str(week)}).park_timeout_s == week
    message = _error({"SFWORKFLOW_PARK_TIMEOUT_S": str(15 * 86400)})  # default retention: 14 days
    assert message.startswith("SFWORKFLOW_PARK_TIMEOUT_S='1296000': ")
    assert "SFWORKFLOW_RETENTION_DAYS" in message and "1209600" in message
    env = {"SFWORKFLOW_PARK_TIMEOUT_S": str(week + 1), "SFWORKFLOW_RETENTION_DAYS": "7"}
    assert "SFWORKFLOW_RETENTION_DAYS" in _error(env)
    env["SFWORKFLOW_RETENTION_DAYS"] = "8"
    assert Settings.from_env(env).park_timeout_s == week + 1


def test_the_park_timeout_is_compared_with_the_retention_to_the_second() -> None:
    env = {"SFWORKFLOW_PARK_TIMEOUT_S": str(7.9 * 86400 + 1), "SFWORKFLOW_RETENTION_DAYS": "7.9"}
    assert "SFWORKFLOW_RETENTION_DAYS" in _error(env)
    Settings.from_env({"SFWORKFLOW_PARK_TIMEOUT_S": str(7.5 * 86400), "SFWORKFLOW_RETENTION_DAYS": "7.9"})


def _clean_environ(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    for name in list(os.environ):
        if name.upper().startswith("SFWORKFLOW_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def test_the_cli_refuses_a_bad_setting(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from sfworkflow.cli.main import main

    _clean_environ(monkeypatch, SFWORKFLOW_USE_UVLOOP="flase")
    assert main(["diagram", "sequence"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sfworkflow: SFWORKFLOW_USE_UVLOOP='flase': ")


# ---- unknown SFWORKFLOW_* variables: warnings ------------------------------------------------------------------
def test_a_misspelt_variable_gets_a_suggestion() -> None:
    assert settings_module.unknown_variables({"SFWORKFLOW_RETENTON_DAYS": "3"}) == [
        "SFWORKFLOW_RETENTON_DAYS is not a setting sfworkflow knows; did you mean SFWORKFLOW_RETENTION_DAYS?"
    ]


def test_a_variable_in_the_wrong_case_gets_a_suggestion() -> None:
    assert settings_module.unknown_variables({"sfworkflow_prefetch": "3"}) == [
        "sfworkflow_prefetch is not a setting sfworkflow knows; did you mean SFWORKFLOW_PREFETCH?"
    ]


def test_an_unknown_variable_without_a_close_match() -> None:
    assert settings_module.unknown_variables({"SFWORKFLOW_ZZZ": "1", "PATH": "/bin", "XSFWORKFLOW_A": "1"}) == [
        "SFWORKFLOW_ZZZ is not a setting sfworkflow knows"
    ]


def test_the_warnings_never_show_values() -> None:
    out = settings_module.unknown_variables({"SFWORKFLOW_ADMIN_TOKN": "a-secret-value-here", "SFWORKFLOW_X": "v4l"})
    assert len(out) == 2 and not any("a-secret-value-here" in w or "v4l" in w for w in out)
    assert out == sorted(out)


def test_known_variables_are_not_reported() -> None:
    env = {f"SFWORKFLOW_{f.name.upper()}": "x" for f in dataclasses.fields(Settings)}
    env |= {
        "SFWORKFLOW_FAULT_POINT": "after_commit_before_ack",
        "SFWORKFLOW_FAULT_AFTER": "3",
        "SFWORKFLOW_SCHEMA_DIR": "/schemas",
        "SFWORKFLOW_CHAOS_PORT": "8130",
        "SFWORKFLOW_TEST_PG": "postgresql://h",
        "SFWORKFLOW_TEST_ANYTHING_ELSE": "1",
        "SFWORKFLOW_BENCH_PG": "postgresql://h",
        "SFWORKFLOW_BENCH_HTTP_PORT": "8097",
    }
    assert settings_module.unknown_variables(env) == []


def test_every_variable_the_repository_reads_is_known() -> None:
    """grep: each SFWORKFLOW_* name written in the code, tests, benchmarks and scripts is one sfworkflow knows."""
    names: set[str] = set()
    files = [*REPO.glob("sfworkflow/**/*.py"), *REPO.glob("tests/**/*.py"), *REPO.glob("bench/**/*.py")]
    files += [*REPO.glob("scripts/*"), REPO / "Dockerfile"]
    for path in files:
        if path.resolve() == Path(__file__).resolve():
            continue  # this file's misspelt names are on purpose
        names |= set(re.findall(r"\bSFWORKFLOW_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    names -= {"SFWORKFLOW_HEADER_PREFIX"}  # a Python constant (x-sfworkflow- headers), not a variable
    assert {"SFWORKFLOW_FAULT_POINT", "SFWORKFLOW_CHAOS_PORT", "SFWORKFLOW_TEST_PG"} <= names
    assert settings_module.unknown_variables(dict.fromkeys(names, "")) == []


def test_the_cli_logs_unknown_variables_as_warnings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sfworkflow.cli.main import main

    _clean_environ(monkeypatch, SFWORKFLOW_RETENTON_DAYS="3", SFWORKFLOW_LOG_FORMAT="json")
    assert main(["diagram", "sequence"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    warnings = [line for line in lines if line.get("level") == "warning"]
    assert [w["event"] for w in warnings] == [
        "SFWORKFLOW_RETENTON_DAYS is not a setting sfworkflow knows; did you mean SFWORKFLOW_RETENTION_DAYS?"
    ]
    assert warnings[0]["variable"] == "SFWORKFLOW_RETENTON_DAYS"
    assert warnings[0]["did_you_mean"] == "SFWORKFLOW_RETENTION_DAYS"


# ---- README -----------------------------------------------------------------------------------------------
def test_the_readme_documents_every_setting_and_the_redelivery_window() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    for f in dataclasses.fields(Settings):
        assert f"`SFWORKFLOW_{f.name.upper()}`" in section, f.name
    assert "REDELIVERY_WINDOW_DAYS" in section and "7 days" in section


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
