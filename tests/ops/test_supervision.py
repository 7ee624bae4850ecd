"""`apex-ingest serve` supervises its processes: none outlives it, even when it is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, text

from tests.conftest import fresh_postgres_database
from tests.service import (
    free_port,
    logged_process,
    running_service,
    service_environment,
    wait_for,
)

pytestmark = pytest.mark.postgres


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found.extend(int(child) for child in children)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_stops_everything_after_the_drain(
    postgres_url: str, signum: signal.Signals
) -> None:
    """What Ctrl-C in a terminal (SIGINT) or `kill -- -PGID` does: every process gets it."""
    with running_service(postgres_url, {"APEX_SHUTDOWN_DRAIN": "0.5"}) as service:
        children = _children(service.process.pid)
        started = time.monotonic()
        os.killpg(service.process.pid, signum)
        code = service.process.wait(25)
        took = time.monotonic() - started
        assert code == 0, service.output()[-3000:]
        assert not [pid for pid in children if _alive(pid)]
        # A worker that missed the signal is killed by granian after 30 s; 25 s failed above.
        # (granian may still log "refused to gracefully stop" for a worker that has closed its
        # pipes but is not yet reaped, 1 ms after join() returned: seen once under load, in a
        # run that stopped in time. The time is what tells a worker that ignored the signal.)
        assert took < 10, service.output()[-3000:]


def test_no_process_outlives_a_killed_serve(postgres_url: str) -> None:
    with running_service(postgres_url, {"APEX_GRPC_PROCESSES": "2"}) as service:
        children = _children(service.process.pid)
        # 2 gRPC processes and 2 gateway workers (granian forks or spawns those).
        assert len(children) >= 4, children
        service.process.send_signal(signal.SIGKILL)
        service.process.wait(5)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.2)
        survivors = [pid for pid in children if _alive(pid)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        assert not survivors, [Path(f"/proc/{p}/cmdline").read_bytes() for p in survivors]


def _gateway_workers(serve_pid: int) -> list[int]:
    return [
        pid
        for pid in _children(serve_pid)
        if b"apex_ingest\x00grpc" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def test_a_crashed_gateway_worker_is_replaced(postgres_url: str) -> None:
    with running_service(postgres_url) as service:
        workers = _gateway_workers(service.process.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 20
        replaced: list[int] = []
        while time.monotonic() < deadline and len(replaced) < 2:
            time.sleep(0.2)
            replaced = [pid for pid in _gateway_workers(service.process.pid) if _alive(pid)]
        # granian without respawn_failed_workers shuts the whole gateway down instead.
        assert service.process.poll() is None, service.output()[-3000:]
        assert workers[0] not in replaced and len(replaced) == 2, (replaced, workers)
        for _ in range(10):  # the kernel spreads connections over both workers
            assert requests.get(f"{service.base_url}/healthz", timeout=5).status_code == 200


def test_a_child_that_cannot_start_is_given_up() -> None:
    """Instead of being restarted every second forever, filling the log with tracebacks."""
    from apex_ingest.ops.supervisor import Supervised

    given_up = threading.Event()
    child = Supervised(
        [sys.executable, "-c", "import sys; sys.exit(3)"],
        dict(os.environ),
        stop_timeout=5,
        give_up=given_up.set,
        restart_delay=0.05,
    )
    child.start()
    assert given_up.wait(30)
    assert child.gave_up
    child.stop()


def test_serve_stops_with_an_error_when_its_grpc_server_cannot_start(sqlite_url: str) -> None:
    """Given up before the gateway started, `serve` used to die of its own SIGTERM (143)."""
    script = f"""
import sys
from apex_ingest.ops import supervisor
from apex_ingest.common.settings import ServerSettings
sys.executable = "/bin/false"  # every gRPC child exits at once
settings = ServerSettings(
    database_url={sqlite_url!r}, http_port={free_port()}, grpc_port={free_port()}
)
supervisor.serve_all(settings, 1, 1)
"""
    env = {**os.environ, "APEX_SHUTDOWN_DRAIN": "0.2"}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=90
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "could not start" in result.stderr


def _serve_env(database_url: str, **extra: str) -> dict[str, str]:
    return service_environment(database_url, {"APEX_HTTP_WORKERS": "1", **extra})


def _health(env: dict[str, str]) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{env['APEX_HTTP_PORT']}/healthz", timeout=5)


SERVE = [sys.executable, "-m", "apex_ingest", "serve"]


def test_serve_starts_not_serving_when_its_database_never_answers(silent_database: str) -> None:
    """The migration at start used to wait for the database forever, deaf to SIGTERM."""
    env = _serve_env(silent_database, APEX_DB_CONNECT_TIMEOUT="1")
    with logged_process(SERVE, env) as (process, log_path):
        assert wait_for(lambda: _health(env).json(), 45) is not None, log_path.read_text()[-3000:]
        health = _health(env)
        assert health.status_code == 503 and health.headers["Retry-After"] == "1"
        assert "could not apply migrations at start" in log_path.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0, log_path.read_text()[-3000:]


def test_a_stop_signal_during_the_migration_at_start_stops_serve(silent_database: str) -> None:
    env = _serve_env(silent_database, APEX_DB_CONNECT_TIMEOUT="300")  # the migration waits so
    with logged_process(SERVE, env) as (process, log_path):
        assert wait_for(lambda: "db\x00upgrade" in _child_commands(process.pid), 30) is not None
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0, log_path.read_text()[-3000:]
        assert "stopped before the migrations were applied" in log_path.read_text()


def test_an_unmigrated_database_is_not_serving(tmp_path: Path) -> None:
    """It answered SERVING (the database was reachable) and every event was refused (502)."""
    env = _serve_env(f"sqlite:///{tmp_path / 'empty.db'}", APEX_MIGRATE_ON_START="0")
    with logged_process(SERVE, env) as (_process, log_path):
        assert wait_for(lambda: _health(env).json(), 45) is not None, log_path.read_text()[-3000:]
        assert _health(env).json() == {"status": "NOT_SERVING"}
        assert "apex-ingest db upgrade" in log_path.read_text()


def test_a_migration_that_failed_at_start_is_applied_once_the_database_is_there() -> None:
    """The database was missing when `serve` started: it used to stay NOT_SERVING for good."""
    with fresh_postgres_database(migrate=False) as url:
        missing = url.rsplit("/", 1)[0] + "/apex_not_yet_" + url.rsplit("_", 1)[1]
        env = _serve_env(missing)
        with logged_process(SERVE, env) as (_process, log_path):
            assert wait_for(lambda: _health(env).status_code == 503, 45) is not None
            admin = create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{missing.rsplit("/", 1)[1]}"'))
            try:
                took = wait_for(lambda: _health(env).status_code == 200, 45)
                assert took is not None, log_path.read_text()[-3000:]
                # Logged once the child has exited, which may be after health saw its commit.
                migrated = "database migrated from revision none"
                logged = wait_for(lambda: migrated in log_path.read_text(), 15)
                assert logged is not None, log_path.read_text()[-3000:]
            finally:
                with admin.connect() as connection:
                    name = missing.rsplit("/", 1)[1]
                    connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()


def _child_commands(pid: int) -> str:
    return "\n".join(
        Path(f"/proc/{child}/cmdline").read_text(errors="replace") for child in _children(pid)
    )
