"""The process life cycle: interpreter exit, ``os.fork()`` and ``multiprocessing`` children."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import unittest
from collections import Counter
from pathlib import Path
from typing import Any

from fake_ingest import fake_ingest

from apex_ingest_sdk import Apex


def _track_in_child(url: str, who: str, count: int) -> None:
    apex = Apex("pk_test", url, flush_interval=3600)
    for i in range(count):
        apex.track("e", "/", {"who": who, "i": i})
    # No flush and no close: the child ends through multiprocessing's os._exit.


class ProcessLifeCycle(unittest.TestCase):
    def setUp(self) -> None:
        context = fake_ingest()
        self.fake = context.__enter__()
        self.addCleanup(context.__exit__, None, None, None)

    def test_close_at_interpreter_exit_sends_everything(self) -> None:
        with tempfile.TemporaryDirectory() as directory:
            script = Path(directory) / "exit_without_flush.py"
            script.write_text(
                "import sys\n"
                "from apex_ingest_sdk import Apex\n"
                "apex = Apex('pk_test', sys.argv[1], flush_interval=3600)\n"
                "for i in range(1500):\n"
                "    apex.track('e', '/', {'i': i}, user_id=str(i % 4))\n"
                "print('tracked')\n"
            )
            done = subprocess.run(
                [sys.executable, str(script), self.fake.url],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=directory,
            )
        self.assertEqual(done.returncode, 0, done.stderr)
        events = [e for r in self.fake.accepted for e in r.json["events"]]
        self.assertEqual(sorted(e["data"]["i"] for e in events), list(range(1500)))

    @unittest.skipUnless(hasattr(os, "fork"), "needs os.fork")
    def test_fork_child_has_its_own_sender_and_queue(self) -> None:
        apex = Apex("pk_test", self.fake.url, flush_interval=60.0, timeout=5.0)
        before = [apex.track("e", "/parent", {"who": "parent"}) for _ in range(3)]
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: report through the pipe, never return into unittest
            code = 1
            try:
                os.close(read_end)
                child_ids = [apex.track("e", "/child", {"who": "child"}) for _ in range(4)]
                flushed = apex.flush(10)
                apex.close(10)
                message = {"ids": child_ids, "flushed": flushed}
                os.write(write_end, json.dumps(message).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report: dict[str, Any] = json.loads(pipe.read() or b"{}")
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        self.assertIs(report["flushed"], True)
        # The child sent only its own events; the parent's queue was untouched by the fork.
        self.assertEqual(self.fake.accepted_ids(), report["ids"])
        after = apex.track("e", "/parent", {"who": "parent"})
        self.assertTrue(apex.flush(10))
        apex.close()
        self.assertEqual(
            Counter(self.fake.accepted_ids()), Counter([*report["ids"], *before, after])
        )

    def test_multiprocessing_child_exit_sends_everything(self) -> None:
        methods = [m for m in ("fork", "spawn") if m in multiprocessing.get_all_start_methods()]
        for method in methods:
            with self.subTest(method=method):
                self.fake.requests.clear()
                context: Any = multiprocessing.get_context(method)
                process = context.Process(target=_track_in_child, args=(self.fake.url, method, 700))
                process.start()
                process.join(60)
                self.assertEqual(process.exitcode, 0)
                events = [e for r in self.fake.accepted for e in r.json["events"]]
                self.assertEqual(sorted(e["data"]["i"] for e in events), list(range(700)))
                self.assertEqual({e["data"]["who"] for e in events}, {method})

    def test_pool_closed_and_joined_sends_everything(self) -> None:
        # The pattern docs/sdk.md gives for pools: close() and join(), not terminate().
        pool = multiprocessing.get_context("spawn").Pool(2)
        try:
            pool.starmap(_track_in_child, [(self.fake.url, f"task{n}", 300) for n in range(4)])
        finally:
            pool.close()
            pool.join()
        events = [e for r in self.fake.accepted for e in r.json["events"]]
        self.assertEqual(
            Counter(e["data"]["who"] for e in events), {f"task{n}": 300 for n in range(4)}
        )


if __name__ == "__main__":
    unittest.main()
