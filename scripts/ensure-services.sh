#!/usr/bin/env bash
# Make sure the PostgreSQL and Redis that the tests use are up; start them if this machine has them.
# Without PostgreSQL the postgres tests cannot run: say so loudly, and fail under CI.
set -u
# The server the tests use: APEX_TEST_POSTGRES_URL (SQLAlchemy form) if set, else the local one.
pg_url=${APEX_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
pg_url=${pg_url/+psycopg:/:}

pg_up() { pg_isready -q -d "$pg_url" 2>/dev/null; }
if ! pg_up && command -v pg_ctlcluster >/dev/null 2>&1; then
    echo "PostgreSQL is not answering at $pg_url; starting it"
    for v in $(ls /etc/postgresql 2>/dev/null); do
        pg_ctlcluster --skip-systemctl-redirect "$v" main start || true
    done
    for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
if ! pg_up; then
    echo "#####################################################################" >&2
    echo "# PostgreSQL is NOT reachable at $pg_url." >&2
    echo "# The PostgreSQL tests cannot run. Start PostgreSQL, or set" >&2
    echo "# APEX_TEST_POSTGRES_URL to a server where you may create databases." >&2
    echo "#####################################################################" >&2
    [ "${CI:-}" = "true" ] && exit 1
fi

redis_up() { (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; }
if ! redis_up && command -v redis-server >/dev/null 2>&1; then
    echo "Redis is not answering on 127.0.0.1:6379; starting it"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null || true
    for _ in $(seq 1 20); do redis_up && break; sleep 0.5; done
fi
redis_up || echo "warning: Redis is not reachable on 127.0.0.1:6379; the shared rate-limit tests will fail" >&2
exit 0
