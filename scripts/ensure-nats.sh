#!/usr/bin/env bash
# Stream mode's tests need Debian's nats-server: one JetStream node on 127.0.0.1:4222 (the unit
# tests), and the binary itself (tests/reliability/test_stream_faults.py starts its own cluster).
set -eu
if ! command -v nats-server >/dev/null 2>&1; then
    echo "installing Debian's nats-server for the stream-mode tests"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
fi
nats_up() { (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; }
if ! nats_up; then
    echo "NATS is not answering on 127.0.0.1:4222; starting a JetStream node"
    store=${TMPDIR:-/tmp}/apex-test-nats
    mkdir -p "$store"
    nohup nats-server -js -a 127.0.0.1 -p 4222 -sd "$store" >"$store/nats.log" 2>&1 &
    for _ in $(seq 1 20); do nats_up && break; sleep 0.5; done
fi
nats_up || echo "warning: NATS is not reachable on 127.0.0.1:4222; the stream-mode tests will fail" >&2
exit 0
