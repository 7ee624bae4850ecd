"""apex_ingest.common.settings: every APEX_* variable read in one place, with one set of rules."""

from __future__ import annotations

import ipaddress
import re
import subprocess
from pathlib import Path

import pytest

from apex_ingest.common.settings import (
    ConfigError,
    GatewaySettings,
    LogSettings,
    ServerSettings,
    check_all,
    documented_variables,
    load,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in documented_variables():
        monkeypatch.delenv(name, raising=False)


def test_gateway_defaults() -> None:
    settings = GatewaySettings.from_config({})
    assert settings.grpc_target == "127.0.0.1:50051"
    assert settings.grpc_timeout == 5.0
    assert settings.max_body_bytes == 1048576
    assert settings.rate_limit == "100/second"
    assert settings.rate_limit_storage == "memory://"
    assert settings.trusted_proxies == ()
    assert settings.cors_max_age == 86400
    assert settings.http_threads is None
    assert settings.shutdown_drain == 2.0


def test_gateway_settings_from_strings() -> None:
    settings = GatewaySettings.from_config(
        {
            "APEX_GRPC_TARGET": "dns:///ingest.internal:50051",
            "APEX_GRPC_TIMEOUT": "2.5",
            "APEX_MAX_BODY_BYTES": "2048",
            "APEX_TRUSTED_PROXIES": "10.0.0.0/8,192.0.2.1",
            "TESTING": True,  # Flask's own keys are not settings
        }
    )
    assert settings.grpc_target == "dns:///ingest.internal:50051"
    assert settings.grpc_timeout == 2.5
    assert settings.max_body_bytes == 2048
    assert settings.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.1/32"),
    )


@pytest.mark.parametrize(
    "values",
    [
        {"APEX_GRPC_TIMEOUT": "soon"},
        {"APEX_GRPC_TIMEOUT": "0"},
        {"APEX_GRPC_TIMEOUT": "nan"},
        {"APEX_MAX_BODY_BYTES": "1.5"},
        {"APEX_MAX_BODY_BYTES": "-1"},
        {"APEX_TRUSTED_PROXIES": "10.0.0.0/8, proxy.local"},
        {"APEX_RATE_LIMIT": "lots"},
        {"APEX_RATE_LIMIT_STORAGE": "nowhere://x"},
    ],
)
def test_bad_gateway_settings_name_the_variable(values: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(values))):
        GatewaySettings.from_config(values)


def test_the_same_variable_follows_the_same_rule_everywhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APEX_MAX_BODY_BYTES", "1.5")
    for section in (GatewaySettings, ServerSettings):
        with pytest.raises(ConfigError, match="APEX_MAX_BODY_BYTES"):
            load(section)
    with pytest.raises(ConfigError, match="APEX_MAX_BODY_BYTES"):
        check_all()


def test_default_target_follows_serve_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    def target(**variables: str) -> str:
        for name in ("APEX_HOST", "APEX_GRPC_PORT"):
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        return load(GatewaySettings).grpc_target

    assert target(APEX_GRPC_PORT="6000") == "127.0.0.1:6000"
    assert target(APEX_HOST="0.0.0.0") == "127.0.0.1:50051"
    assert target(APEX_HOST="[::]") == "127.0.0.1:50051"
    assert target(APEX_HOST="::") == "127.0.0.1:50051"
    assert target(APEX_HOST="10.1.1.1") == "10.1.1.1:50051"
    assert target(APEX_HOST="::1") == "[::1]:50051"


def test_threads_default_to_granians(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(GatewaySettings).http_threads is None
    monkeypatch.setenv("APEX_HTTP_THREADS", " ")
    assert load(GatewaySettings).http_threads is None


def test_threads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APEX_HTTP_THREADS", " 8 ")
    assert load(GatewaySettings).http_threads == 8


@pytest.mark.parametrize("raw", ["0", "-4", "eight", "2.5"])
def test_threads_reject_nonsense(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("APEX_HTTP_THREADS", raw)
    with pytest.raises(ConfigError, match="APEX_HTTP_THREADS"):
        load(GatewaySettings)


@pytest.mark.parametrize(("raw", "seconds"), [("", 2.0), ("0", 0.0), ("1.5", 1.5), (" 30 ", 30.0)])
def test_drain_seconds(monkeypatch: pytest.MonkeyPatch, raw: str, seconds: float) -> None:
    monkeypatch.setenv("APEX_SHUTDOWN_DRAIN", raw)
    assert load(GatewaySettings).shutdown_drain == seconds


@pytest.mark.parametrize("raw", ["soon", "-1", "301", "nan"])
def test_drain_seconds_rejects_nonsense(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("APEX_SHUTDOWN_DRAIN", raw)
    with pytest.raises(ConfigError, match="APEX_SHUTDOWN_DRAIN"):
        load(GatewaySettings)


@pytest.mark.parametrize(
    ("raw", "enabled"),
    [(None, True), ("1", True), ("yes", True), ("0", False), ("false", False), (" OFF ", False)],
)
def test_the_access_log_switch_reads_the_usual_words(
    monkeypatch: pytest.MonkeyPatch, raw: str | None, enabled: bool
) -> None:
    if raw is not None:
        monkeypatch.setenv("APEX_ACCESS_LOG", raw)
    assert load(LogSettings).access_log is enabled


def test_a_yes_no_setting_refuses_other_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APEX_MIGRATE_ON_START", "perhaps")
    with pytest.raises(ConfigError, match="APEX_MIGRATE_ON_START"):
        load(ServerSettings)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgres://x/y", "postgresql\\+psycopg"),
        ("mysql://x/y", "sqlite:///PATH or postgresql"),
        ("postgresql://h:port/db", "not a database URL"),
        ("sqlite:////no/such/dir/x.db", "does not exist"),
        ("nonsense", "not a database URL"),
    ],
)
def test_database_urls(monkeypatch: pytest.MonkeyPatch, url: str, problem: str) -> None:
    monkeypatch.setenv("APEX_DATABASE_URL", url)
    with pytest.raises(ConfigError, match=f"APEX_DATABASE_URL: .*{problem}"):
        load(ServerSettings)


def _readme_table() -> dict[str, str]:
    """The README's configuration table: variable -> default column."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(APEX_[A-Z_]+)` \| ([^|]*) \|", section, re.MULTILINE)
    return {name: default.strip() for name, default in rows}


def test_the_readme_documents_every_setting_and_no_other() -> None:
    documented = _readme_table()
    assert sorted(documented) == sorted(documented_variables())


@pytest.mark.parametrize("name", sorted(documented_variables()))
def test_the_readme_states_each_default(name: str) -> None:
    default = documented_variables()[name]
    shown = _readme_table()[name].strip("`")
    if default in (None, "", ()):
        assert shown, name  # no fixed value: the README says in words what happens
    elif isinstance(default, bool):
        assert shown in (("1", "on", "true") if default else ("0", "off", "false")), name
    elif isinstance(default, int | float):
        assert float(shown) == default, f"README says {shown} for {name}, the code {default!r}"
    else:
        assert shown == default, f"README says {shown} for {name}, the code {default!r}"


def test_only_the_settings_module_touches_the_environment() -> None:
    found = subprocess.run(
        ["grep", "-rln", "os.environ", "apex_ingest", "gateway", "--include=*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    assert found == ["apex_ingest/common/settings.py"]


@pytest.mark.parametrize(
    "target",
    ["::::", "localhost:", "host:0", "host:65536", "host:grpc", "::1:50051", ":50051", "a b:1"],
)
def test_a_grpc_target_no_channel_could_use_names_the_variable(target: str) -> None:
    with pytest.raises(ConfigError, match=r"^APEX_GRPC_TARGET: must be HOST:PORT or HOST"):
        GatewaySettings.from_config({"APEX_GRPC_TARGET": target})


@pytest.mark.parametrize(
    "target",
    [
        "127.0.0.1:50051",
        "grpc.internal:443",
        "grpc.internal",  # gRPC's default port, 443
        "[::1]:50051",
        "dns:///grpc:50051",
        "DNS:///grpc:50051",
        "unix:/run/a",
        "ipv4:10.0.0.1:50051,10.0.0.2:50051",
        "xds:///ingest",
        "google-c2p:///ingest",
    ],
)
def test_grpc_targets_channels_take(target: str) -> None:
    assert GatewaySettings.from_config({"APEX_GRPC_TARGET": target}).grpc_target == target
