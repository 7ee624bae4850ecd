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


def test_a_first_update_from_a_daemon_thread_still_reaches_the_file_at_exit(
    tmp_path: Path,
) -> None:
    """The flusher copied the daemon flag of the thread that started it; in a granian worker
    that is a request thread, a daemon: the worker's last updates were lost at exit."""
    _run(
        tmp_path,
        """
        counter = Counter("c", "c")
        first = threading.Thread(target=counter.inc, daemon=True)
        first.start()
        first.join()
        assert metric_values._flusher is not None and not metric_values._flusher.daemon
        for _ in range(999):
            counter.inc()
        """,
    )
    assert _value(_files(tmp_path), "c_total") == 1000


def test_updates_whose_write_failed_are_written_by_a_later_flush(tmp_path: Path) -> None:
    _run(
        tmp_path,
        """
        import contextlib

        gauge = Gauge("g", "g", multiprocess_mode="max")
        counter = Counter("c", "c")
        with metric_values._flush_lock:  # no flush between the updates and the failure
            gauge.set(10)
            counter.inc(2)
            real_set = gauge._value._file.set

            def full_disk(*args):
                raise OSError(28, "No space left on device")

            gauge._value._file.set = full_disk
        with contextlib.suppress(OSError):
            metric_values.flush()
        gauge._value._file.set = real_set
        counter.inc(3)
        metric_values.flush()
        """,
    )
    samples = _files(tmp_path)
    assert _value(samples, "g") == 10
    assert _value(samples, "c_total") == 5


def test_a_fork_during_a_flush_leaves_the_child_free_to_update(tmp_path: Path) -> None:
    """prometheus-client's lock is held while a value is written: a fork at that moment gave
    a child whose first new metric child, or first flush, waited on it forever."""
    out = _run(
        tmp_path,
        """
        from prometheus_client import mmap_dict

        counter = Counter("c", "c", ["n"])
        counter.labels("0").inc()
        real_write = mmap_dict.MmapedDict.write_value
        writing = threading.Event()

        def slow_write(self, *args):
            writing.set()
            time.sleep(0.5)
            return real_write(self, *args)

        mmap_dict.MmapedDict.write_value = slow_write
        threading.Thread(target=metric_values.flush).start()
        writing.wait(5)
        pid = os.fork()
        if pid == 0:
            mmap_dict.MmapedDict.write_value = real_write
            counter.labels("child").inc()
            metric_values.flush()
            os._exit(0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                print("child exited", status)
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            print("child hung")
        """,
    )
    assert out.strip() == "child exited 0"
    assert _value(_files(tmp_path), "c_total") == 2
