"""A 3-node NATS JetStream cluster on free loopback ports, for the stream-mode fault test and
the bench: Debian's `nats-server`, one config file and store directory per node in a tmp dir.

with nats_cluster(tmp_path) as cluster:
    cluster.url            # "nats://127.0.0.1:p1,nats://127.0.0.1:p2,nats://127.0.0.1:p3"
    cluster.kill(name)     # kill -9 one node
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.service import free_port

NODES = ("n1", "n2", "n3")


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"


@dataclass
class Cluster:
    nodes: dict[str, Node] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes.values())

    def start(self, name: str) -> None:
        node = self.nodes[name]
        log = node.log.open("ab")
        node.process = subprocess.Popen(
            ["nats-server", "-c", str(node.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def kill(self, name: str) -> None:
        """kill -9: no goodbye to the cluster, no flush."""
        process = self.nodes[name].process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)

    def stop_all(self) -> None:
        for node in self.nodes.values():
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
                try:
                    node.process.wait(10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {node.name} ---\n{node.log.read_text(errors='replace')[-3000:]}"
            for node in self.nodes.values()
            if node.log.exists()
        )


def write_configs(directory: Path) -> Cluster:
    cluster = Cluster()
    ports = {name: (free_port(), free_port()) for name in NODES}
    for name, (port, cluster_port) in ports.items():
        routes = ", ".join(
            f"nats-route://127.0.0.1:{other[1]}" for peer, other in ports.items() if peer != name
        )
        store = directory / name
        store.mkdir(parents=True, exist_ok=True)
        config = directory / f"{name}.conf"
        config.write_text(
            f"""server_name: {name}
listen: 127.0.0.1:{port}
# A request may hold 500 events of up to 32 KiB of data each: one message per request.
max_payload: 8MB
jetstream {{
  store_dir: "{store}"
  max_memory_store: 64MB
  max_file_store: 2GB
}}
cluster {{
  name: apex-test
  listen: 127.0.0.1:{cluster_port}
  routes: [{routes}]
}}
"""
        )
        cluster.nodes[name] = Node(name, port, cluster_port, config, directory / f"{name}.log")
    return cluster


@contextlib.contextmanager
def nats_cluster(directory: Path) -> Iterator[Cluster]:
    if shutil.which("nats-server") is None:
        raise RuntimeError("nats-server is not installed (scripts/ensure-nats.sh installs it)")
    cluster = write_configs(directory)
    for name in NODES:
        cluster.start(name)
    try:
        yield cluster
    finally:
        cluster.stop_all()
