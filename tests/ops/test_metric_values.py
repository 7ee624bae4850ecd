"""apex_ingest/common/metric_values.py: metric updates kept in memory, written by a flusher.

Each check runs in a fresh interpreter with PROMETHEUS_MULTIPROC_DIR set (prometheus-client
decides at import whether it is in multiprocess mode), then reads the files as a scrape would.
They fail loudly when prometheus-client stops building metric values through
`prometheus_client.values.ValueClass`, the hook the module relies on.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from tests.ops.support import Samples


def _run(directory: Path, script: str) -> str:
    prologue = """
        import os, threading, time
        from apex_ingest.common import metrics, metric_values
        from prometheus_client import Counter, Gauge, Histogram
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(prologue) + textwrap.dedent(script)],
        env={"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _files(directory: Path) -> Samples:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in registry.collect()
        for sample in family.samples
    ]


def _value(samples: Samples, name: str) -> float:
    return sum(v for n, _, v in samples if n == name)


def test_updates_from_many_threads_all_reach_the_files_by_exit(tmp_path: Path) -> None:
    _run(
        tmp_path,
        """
        assert metric_values.installed()
        counter = Counter("c", "c", ["kind"])
        gauge = Gauge("g", "g", multiprocess_mode="livesum")
        histogram = Histogram("h", "h", buckets=(1, 10))
        # Every child is built through the hook: else updates bypass it, and this test would
        # pass on writes prometheus-client made itself.
        for value in (counter.labels("a")._value, gauge._value, histogram._sum):
            assert isinstance(value, metric_values.DeferredValue), type(value)

        def work():
            for _ in range(2000):
                counter.labels("a").inc()
                gauge.inc()
                histogram.observe(5)
                gauge.dec()

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        gauge.inc(3)
        # No flush: the process's exit writes what is left.
        """,
    )
    samples = _files(tmp_path)
    assert _value(samples, "c_total") == 16_000
    assert _value(samples, "h_count") == 16_000
    assert _value(samples, "h_sum") == 80_000
    assert _value(samples, "g") == 3


def test_a_running_process_writes_its_updates_within_the_flush_interval(tmp_path: Path) -> None:
    out = _run(
        tmp_path,
        """
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        def on_file():
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=os.environ["PROMETHEUS_MULTIPROC_DIR"])
            return [s.value for f in registry.collect() for s in f.samples if s.name == "c_total"]

        counter = Counter("c", "c")
        counter.inc(7)
        deadline = time.monotonic() + 10
        while on_file() != [7.0] and time.monotonic() < deadline:
            time.sleep(0.01)
        print(on_file())
        """,
    )
    assert out.strip() == "[7.0]"


def test_a_forked_child_counts_in_its_own_file_from_zero(tmp_path: Path) -> None:
    _run(
        tmp_path,
        """
        counter = Counter("c", "c")
        counter.inc(3)
        pid = os.fork()
        if pid == 0:
            counter.inc(5)
            raise SystemExit(0)  # the child's flusher writes at exit
        _, status = os.waitpid(pid, 0)
        assert status == 0, status
        metric_values.flush()
        """,
    )
    per_file = sorted(v for n, _, v in _files(tmp_path) if n == "c_total")
    # One sample: the collector adds the files up. The parent's 3 were not copied to the child.
    assert per_file == [8]


def test_a_scrape_in_the_process_sees_its_latest_updates(tmp_path: Path) -> None:
    out = _run(
        tmp_path,
        """
        from prometheus_client import generate_latest

        counter = Counter("c", "c")
        for _ in range(1000):
            counter.inc()
        text = generate_latest(metrics.registry()).decode()
        print([line for line in text.splitlines() if line.startswith("c_total")])
        """,
    )
    assert out.strip() == "['c_total 1000.0']"
