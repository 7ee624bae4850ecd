"""Batching, retries, error splitting, flush and close: ``Apex`` over an in-process fake
``Transport`` (no sockets)."""

from __future__ import annotations

import json
import logging
import threading
import time
import unittest
from collections import Counter
from typing import Any
from unittest import mock

from fake_ingest import (
    Answer,
    Errors,
    FailingTransport,
    FakeIngest,
    Received,
    foreign,
    ok,
    refuse,
)

from apex_ingest_sdk import Apex, ApexError

STAMP = "2026-12-04T10:00:00Z"
PAD = {"pad": "x" * 300}


def client(fake: FakeIngest, **kwargs: Any) -> Apex:
    options: dict[str, Any] = {
        "flush_interval": 60.0,
        "backoff_base": 0.01,
        "timeout": 5.0,
        "transport": fake.transport,
    }
    options.update(kwargs)
    return Apex("pk_test", "http://ingest.test", **options)


class Batching(unittest.TestCase):
    def setUp(self) -> None:
        self.fake = FakeIngest()

    def test_users_share_batches_and_each_event_carries_its_user(self) -> None:
        # One batch per user would send 1000 requests here, against a per-key rate limit.
        apex = client(self.fake)
        users = [f"user_{i}" for i in range(1000)]
        ids = [apex.track("e", "/", user_id=user) for user in users]
        self.assertTrue(apex.close(30))
        self.assertEqual([len(r.ids) for r in self.fake.requests], [500, 500])
        self.assertTrue(all("userId" not in r.json for r in self.fake.requests))
        sent = [(e["id"], e["userId"]) for r in self.fake.accepted for e in r.json["events"]]
        self.assertEqual(sent, list(zip(ids, users, strict=True)))

    def test_events_without_a_user_carry_none(self) -> None:
        apex = client(self.fake)
        for user in (None, "alice", ""):
            apex.track("e", "/", user_id=user)
        apex.close()
        [request] = self.fake.requests
        # "" means no user to the server, so it is not sent either.
        self.assertEqual([e.get("userId") for e in request.json["events"]], [None, "alice", None])

    def test_request_goes_to_the_events_url_with_the_timeout(self) -> None:
        apex = client(self.fake, timeout=3.5)
        apex.track("e", "/")
        apex.close()
        [request] = self.fake.requests
        self.assertEqual(request.url, "http://ingest.test/api/events")
        self.assertEqual(request.timeout, 3.5)
        self.assertEqual(request.headers["Content-Type"], "application/json")
        self.assertEqual(request.headers["Content-Encoding"], "gzip")
        self.assertTrue(request.headers["User-Agent"].startswith("apex-ingest-sdk-python/"))

    def test_uncompressed_when_asked(self) -> None:
        apex = client(self.fake, compress=False)
        apex.track("e", "/")
        apex.close()
        [request] = self.fake.requests
        self.assertNotIn("Content-Encoding", request.headers)
        self.assertEqual(request.raw, request.body)

    def test_split_at_500_and_full_batches_go_without_waiting(self) -> None:
        apex = client(self.fake, flush_interval=3600.0)
        ids = [apex.track("e", "/", user_id="u") for _ in range(1234)]
        # Two full batches leave at once; the 234 rest wait for the interval or a flush.
        self.assertTrue(self.fake.wait_for_requests(2, timeout=10))
        time.sleep(0.2)
        self.assertEqual([len(r.ids) for r in self.fake.requests], [500, 500])
        self.assertTrue(apex.flush(10))
        self.assertEqual([len(r.ids) for r in self.fake.requests], [500, 500, 234])
        self.assertEqual(self.fake.accepted_ids(), ids)
        apex.close()

    def test_split_by_body_size(self) -> None:
        apex = client(self.fake, max_body_bytes=4000)
        ids = [apex.track("e", "/", {"pad": "x" * 300}) for _ in range(50)]
        apex.close()
        self.assertGreater(len(self.fake.requests), 1)
        self.assertTrue(all(len(r.body) <= 4000 for r in self.fake.requests))
        self.assertEqual(self.fake.accepted_ids(), ids)

    def test_a_batch_filled_to_the_byte_limit_is_accepted_at_once(self) -> None:
        def event(i: int) -> dict[str, Any]:
            return {"id": f"{i:032x}", "type": "e", "url": "/", "timestamp": STAMP, "data": PAD}

        size = len(json.dumps(event(0), separators=(",", ":")))
        head = len(b'{"projectKey":"pk_test","events":[')
        # Ten events fill a body to the byte, before the sentAt each request is stamped with.
        limit = head + 10 * size + 9 + len(b"]}")
        self.fake.responder = lambda r, n: (
            refuse(413, "too large") if len(r.body) > limit else ok(r, n)
        )
        apex = client(self.fake, max_body_bytes=limit)
        for i in range(20):
            apex.track("e", "/", PAD, id=event(i)["id"], timestamp=STAMP)
        apex.close()
        self.assertNotIn(413, self.fake.statuses)
        self.assertEqual([len(r.ids) for r in self.fake.requests], [9, 9, 2])
        self.assertEqual(self.fake.accepted_ids(), [event(i)["id"] for i in range(20)])

    def test_flush_interval_sends_without_flush(self) -> None:
        apex = client(self.fake, flush_interval=0.2)
        apex.track("e", "/")
        self.assertTrue(self.fake.wait_for_requests(1, timeout=5))
        apex.close()

    def test_concurrent_tracking_delivers_each_event_once(self) -> None:
        apex = client(self.fake, flush_interval=0.05)
        tracked: list[list[str]] = [[] for _ in range(8)]

        def work(n: int) -> None:
            for i in range(1000):
                tracked[n].append(apex.track("e", "/", {"i": i}, user_id=f"u{n % 3}"))

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertTrue(apex.close(30))
        expected = [i for ids in tracked for i in ids]
        self.assertEqual(len(set(expected)), 8000)
        self.assertEqual(Counter(self.fake.accepted_ids()), Counter(expected))
        self.assertTrue(all(len(r.ids) <= 500 for r in self.fake.requests))


class Retries(unittest.TestCase):
    def setUp(self) -> None:
        self.fake = FakeIngest()

    def test_backoff_doubles_from_backoff_base(self) -> None:
        ceilings: list[float] = []

        def no_wait(low: float, high: float) -> float:
            ceilings.append(high)
            return 0.0

        failing = FailingTransport()
        apex = client(
            self.fake, transport=failing, backoff_base=0.5, max_retries=4, on_error=Errors()
        )
        apex.track("e", "/")
        with mock.patch("apex_ingest_sdk.consumer.random.uniform", no_wait):
            self.assertTrue(apex.flush(10))
        apex.close()
        # The first retry waits up to backoff_base itself (docs/sdk.md: 2**(n - 1)).
        self.assertEqual(ceilings, [0.5, 1.0, 2.0, 4.0])

    def test_503_then_200_stores_each_event_once(self) -> None:
        def responder(request: Received, n: int) -> Answer:
            return refuse(503, "storage down") if n < 2 else ok(request, n)

        self.fake.responder = responder
        errors = Errors()
        # backoff_max caps the gateway's Retry-After (1 s) to keep the test fast.
        apex = client(self.fake, on_error=errors, backoff_max=0.05)
        ids = [apex.track("e", f"/{i}") for i in range(20)]
        self.assertTrue(apex.flush(10))
        apex.close()
        self.assertEqual(self.fake.statuses, [503, 503, 200])
        # Every attempt carried the same ids, so the server stores one copy of each.
        self.assertTrue(all(r.ids == ids for r in self.fake.requests))
        self.assertEqual(Counter(self.fake.accepted_ids()), Counter({i: 1 for i in ids}))
        self.assertEqual(errors.calls, [])

    def test_every_retryable_status_is_retried(self) -> None:
        for status in (408, 429, 500, 502, 503, 504):
            with self.subTest(status=status):
                fake = FakeIngest()

                def responder(request: Received, n: int, status: int = status) -> Answer:
                    if n > 0:
                        return ok(request, n)
                    return refuse(status) if status != 408 else foreign(408)

                fake.responder = responder
                apex = client(fake, backoff_max=0.05)
                apex.track("e", "/")
                self.assertTrue(apex.flush(10))
                apex.close()
                self.assertEqual(fake.statuses, [status, 200])

    def test_429_honours_retry_after(self) -> None:
        times: list[float] = []

        def responder(request: Received, n: int) -> Answer:
            times.append(time.monotonic())
            return refuse(429, "slow down", retry_after=1) if n == 0 else ok(request, n)

        self.fake.responder = responder
        apex = client(self.fake)
        ids = [apex.track("e", "/") for _ in range(5)]
        self.assertTrue(apex.flush(10))
        apex.close()
        self.assertEqual(self.fake.statuses, [429, 200])
        self.assertGreaterEqual(times[1] - times[0], 0.95)
        self.assertEqual(self.fake.accepted_ids(), ids)

    def test_retry_after_is_capped_at_backoff_max(self) -> None:
        times: list[float] = []

        def responder(request: Received, n: int) -> Answer:
            times.append(time.monotonic())
            return refuse(503, "down", retry_after=3600) if n == 0 else ok(request, n)

        self.fake.responder = responder
        apex = client(self.fake, backoff_max=0.2)
        apex.track("e", "/")
        self.assertTrue(apex.flush(10))
        apex.close()
        self.assertLess(times[1] - times[0], 2.0)

    def test_retries_give_up_after_max_retries(self) -> None:
        self.fake.responder = lambda r, n: refuse(503, "storage down")
        errors = Errors()
        apex = client(self.fake, on_error=errors, max_retries=3, backoff_max=0.01)
        ids = [apex.track("e", "/") for _ in range(4)]
        self.assertTrue(apex.flush(10))
        apex.close()
        self.assertEqual(len(self.fake.requests), 4)
        [(error, events)] = errors.calls
        self.assertEqual((error.status, error.code), (503, "unavailable"))
        self.assertEqual(error.message, "storage down")
        self.assertEqual(error.retry_after, 1.0)
        self.assertEqual([e["id"] for e in events], ids)

    def test_network_errors_are_retried_then_reported(self) -> None:
        errors = Errors()
        transport = FailingTransport()
        apex = Apex(
            "pk_test",
            "http://ingest.test",
            flush_interval=60,
            backoff_base=0.01,
            max_retries=2,
            on_error=errors,
            transport=transport,
        )
        apex.track("e", "/", user_id="u")
        self.assertTrue(apex.flush(10))
        apex.close()
        self.assertEqual(transport.calls, 3)
        [(error, events)] = errors.calls
        self.assertEqual((error.code, error.status), ("network_error", None))
        self.assertIn("Connection refused", error.message)
        self.assertEqual(events[0]["userId"], "u")


class Refusals(unittest.TestCase):
    def setUp(self) -> None:
        self.fake = FakeIngest()

    def test_400_reaches_on_error_without_retry(self) -> None:
        self.fake.responder = lambda r, n: refuse(
            400, "projectKey is too long", ("projectKey", "must be 1-128 characters")
        )
        errors = Errors()
        apex = client(self.fake, on_error=errors)
        ids = [apex.track("e", "/") for _ in range(3)]
        self.assertTrue(apex.flush(10))
        apex.close()
        self.assertEqual(len(self.fake.requests), 1)
        [(error, events)] = errors.calls
        self.assertEqual((error.status, error.code), (400, "invalid_request"))
        self.assertEqual(error.message, "projectKey is too long")
        self.assertEqual(error.field_violations, [("projectKey", "must be 1-128 characters")])
        self.assertEqual([e["id"] for e in events], ids)
        self.assertIn("projectKey is too long", str(error))

    def test_400_for_some_events_still_delivers_the_others(self) -> None:
        def responder(request: Received, n: int) -> Answer:
            bad = [
                (f"events[{i}].url", "must be an absolute http(s) URL or a path starting with /")
                for i, e in enumerate(request.json["events"])
                if e["url"] == "bad"
            ]
            return refuse(400, "invalid events", *bad) if bad else ok(request, n)

        self.fake.responder = responder
        errors = Errors()
        apex = client(self.fake, on_error=errors)
        urls = ["/a", "bad", "/b", "bad", "/c"]
        ids = [apex.track("e", url) for url in urls]
        apex.close()
        self.assertEqual(self.fake.statuses, [400, 200])
        self.assertEqual(self.fake.accepted_ids(), [ids[0], ids[2], ids[4]])
        [(error, events)] = errors.calls
        self.assertEqual([e["id"] for e in events], [ids[1], ids[3]])
        # Paths now index the events handed to on_error.
        self.assertEqual([f for f, _ in error.field_violations], ["events[0].url", "events[1].url"])

    def test_400_naming_a_request_field_fails_the_whole_batch(self) -> None:
        self.fake.responder = lambda r, n: refuse(
            400, "bad", ("events[0].url", "bad"), ("projectKey", "bad")
        )
        errors = Errors()
        apex = client(self.fake, on_error=errors)
        ids = [apex.track("e", "/") for _ in range(3)]
        apex.close()
        self.assertEqual(len(self.fake.requests), 1)
        self.assertEqual([e["id"] for e in errors.events], ids)

    def test_413_halves_the_batch(self) -> None:
        def responder(request: Received, n: int) -> Answer:
            if len(request.body) > 1500:
                return refuse(413, "body over the limit")
            return ok(request, n)

        self.fake.responder = responder
        errors = Errors()
        apex = client(self.fake, on_error=errors)
        ids = [apex.track("e", "/", {"pad": "y" * 100}) for _ in range(40)]
        apex.close()
        self.assertEqual(sorted(self.fake.accepted_ids()), sorted(ids))
        self.assertEqual(errors.calls, [])

    def test_a_single_event_too_large_reaches_on_error(self) -> None:
        self.fake.responder = lambda r, n: refuse(413, "too large")
        errors = Errors()
        apex = client(self.fake, on_error=errors)
        event_id = apex.track("e", "/", {"pad": "z" * 100})
        apex.close()
        [(error, events)] = errors.calls
        self.assertEqual((error.status, error.code), (413, "payload_too_large"))
        self.assertEqual([e["id"] for e in events], [event_id])

    def test_each_gateway_refusal_keeps_its_code(self) -> None:
        for status in (401, 403, 415):
            with self.subTest(status=status):
                fake = FakeIngest()

                def responder(request: Received, n: int, status: int = status) -> Answer:
                    return refuse(status, "no")

                fake.responder = responder
                errors = Errors()
                apex = client(fake, on_error=errors)
                apex.track("e", "/")
                apex.close()
                self.assertEqual(len(fake.requests), 1)  # not retried
                [(error, _)] = errors.calls
                expected = {401: "unauthorized", 403: "forbidden", 415: "unsupported_media_type"}
                self.assertEqual((error.status, error.code), (status, expected[status]))

    def test_a_proxy_page_gets_the_code_of_its_status(self) -> None:
        self.fake.responder = lambda r, n: foreign(502, body=b"<html>Bad Gateway</html>")
        errors = Errors()
        apex = client(self.fake, on_error=errors, max_retries=1)
        apex.track("e", "/")
        apex.close()
        [(error, _)] = errors.calls
        self.assertEqual((error.status, error.code), (502, "bad_gateway"))
        self.assertIn("Bad Gateway", error.message)

    def test_404_and_405_fail_at_once_with_a_clear_error(self) -> None:
        answers = {
            "gateway 404": refuse(404, "No such endpoint."),
            "gateway 405": refuse(405, "Method not allowed."),
            "other server's 404": foreign(404, body=b"<h1>Not Found</h1>"),
        }
        for name, answer in answers.items():
            with self.subTest(name):
                fake = FakeIngest()

                def same(request: Received, n: int, answer: Answer = answer) -> Answer:
                    return answer

                fake.responder = same
                errors = Errors()
                # Defaults otherwise: a retried failure would take tens of seconds to report.
                apex = Apex(
                    "pk_test", "http://ingest.test", on_error=errors, transport=fake.transport
                )
                apex.track("e", "/")
                started = time.monotonic()
                self.assertTrue(apex.flush(5))
                self.assertLess(time.monotonic() - started, 2.0)
                apex.close()
                self.assertEqual(len(fake.requests), 1)
                [(error, events)] = errors.calls
                self.assertEqual(error.status, answer.status)
                self.assertEqual(
                    error.code, {404: "not_found", 405: "method_not_allowed"}[answer.status]
                )
                self.assertIn("not an Apex Ingest gateway", error.message)
                self.assertIn("http://ingest.test/api/events", str(error))
                self.assertEqual(len(events), 1)

    def test_redirect_is_an_error_not_a_silent_loss(self) -> None:
        self.fake.responder = lambda r, n: foreign(302, {"Location": "/elsewhere"})
        errors = Errors()
        apex = client(self.fake, on_error=errors)
        apex.track("e", "/")
        apex.close()
        [(error, _)] = errors.calls
        self.assertEqual((error.status, error.code), (302, "http_302"))


class Reporting(unittest.TestCase):
    def setUp(self) -> None:
        self.fake = FakeIngest()

    def test_queue_full_drops_the_newest_and_reports_it(self) -> None:
        errors = Errors()
        apex = client(self.fake, max_queue=5, on_error=errors)
        ids = [apex.track("e", f"/{i}") for i in range(8)]
        self.assertEqual([e["id"] for e in errors.events], ids[5:])
        self.assertTrue(all(error.code == "queue_full" for error, _ in errors.calls))
        self.assertEqual(apex.pending, 5)
        apex.close()
        self.assertEqual(self.fake.accepted_ids(), ids[:5])

    def test_queue_full_without_callback_logs_a_warning(self) -> None:
        apex = client(self.fake, max_queue=1)
        with self.assertLogs("apex_ingest_sdk", logging.WARNING) as logs:
            apex.track("e", "/")
            apex.track("e", "/")
            apex.track("e", "/")
        apex.close()
        self.assertTrue(any("dropped" in line for line in logs.output))

    def test_undelivered_events_without_callback_are_logged(self) -> None:
        self.fake.responder = lambda r, n: refuse(401, "unknown projectKey")
        apex = client(self.fake)
        with self.assertLogs("apex_ingest_sdk", logging.WARNING) as logs:
            apex.track("e", "/")
            apex.close()
        self.assertTrue(any("unknown projectKey" in line for line in logs.output))

    def test_a_failing_callback_does_not_stop_the_sender(self) -> None:
        def explode(error: ApexError, events: list[dict[str, Any]]) -> None:
            raise RuntimeError("boom")

        self.fake.responder = lambda r, n: refuse(400, "no") if n == 0 else ok(r, n)
        apex = client(self.fake, on_error=explode)
        with self.assertLogs("apex_ingest_sdk", logging.ERROR):
            apex.track("e", "/")
            self.assertTrue(apex.flush(5))
        second = apex.track("e", "/")
        self.assertTrue(apex.flush(5))
        apex.close()
        self.assertEqual(self.fake.accepted_ids(), [second])

    def test_a_transport_bug_is_reported_as_internal_error(self) -> None:
        def broken(request: Received, n: int) -> Answer:
            raise KeyError("bug")

        self.fake.responder = broken
        errors = Errors()
        apex = client(self.fake, on_error=errors)
        event_id = apex.track("e", "/")
        with self.assertLogs("apex_ingest_sdk", logging.ERROR):
            apex.close()
        [(error, events)] = errors.calls
        self.assertEqual((error.code, error.status), ("internal_error", None))
        self.assertEqual([e["id"] for e in events], [event_id])


class FlushAndClose(unittest.TestCase):
    def setUp(self) -> None:
        self.fake = FakeIngest()

    def test_flush_semantics(self) -> None:
        release = threading.Event()

        def hanging(request: Received, n: int) -> Answer:
            release.wait(10)
            return ok(request, n)

        apex = client(self.fake)
        self.assertTrue(apex.flush(0.1))  # nothing queued: returns at once
        self.fake.responder = hanging
        first = apex.track("e", "/")
        self.assertFalse(apex.flush(0.3))  # the request is in flight and the server holds it
        second = apex.track("e", "/")
        release.set()
        self.assertTrue(apex.flush(10))
        # flush() covers everything tracked before it was called, including the in-flight batch.
        self.assertEqual(self.fake.accepted_ids(), [first, second])
        apex.close()

    def test_flush_from_on_error_returns_false(self) -> None:
        results: list[bool] = []
        apex_box: list[Apex] = []

        def on_error(error: ApexError, events: list[dict[str, Any]]) -> None:
            results.append(apex_box[0].flush(1))

        self.fake.responder = lambda r, n: refuse(400, "no")
        apex = client(self.fake, on_error=on_error)
        apex_box.append(apex)
        apex.track("e", "/")
        self.assertTrue(apex.flush(5))
        apex.close()
        self.assertEqual(results, [False])

    def test_flush_from_many_threads_at_once(self) -> None:
        apex = client(self.fake)
        results: list[bool] = []

        def work(n: int) -> None:
            for i in range(50):
                apex.track("e", f"/{n}/{i}", user_id=f"u{n}")
            results.append(apex.flush(10))

        threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        apex.close()
        self.assertEqual(results, [True] * 6)
        accepted = self.fake.accepted_ids()
        self.assertEqual(len(accepted), 300)
        self.assertEqual(len(set(accepted)), 300)

    def test_close_flushes_and_later_tracks_are_reported(self) -> None:
        errors = Errors()
        apex = client(self.fake, on_error=errors)
        ids = [apex.track("e", "/") for _ in range(3)]
        self.assertTrue(apex.close(5))
        self.assertEqual(self.fake.accepted_ids(), ids)
        late = apex.track("e", "/", user_id="u")
        [(error, events)] = errors.calls
        self.assertEqual(error.code, "closed")
        self.assertEqual((events[0]["id"], events[0]["userId"]), (late, "u"))
        self.assertTrue(apex.close(1))  # idempotent
        self.assertTrue(apex.flush(1))

    def test_context_manager_closes(self) -> None:
        with client(self.fake) as apex:
            event_id = apex.track("e", "/")
        self.assertEqual(self.fake.accepted_ids(), [event_id])

    def test_close_with_timeout_gives_up_and_reports(self) -> None:
        self.fake.responder = lambda r, n: refuse(503, "down", retry_after=30)
        errors = Errors()
        apex = client(self.fake, on_error=errors, backoff_max=30.0)
        ids = [apex.track("e", "/") for _ in range(3)]
        started = time.monotonic()
        self.assertFalse(apex.close(0.5))
        self.assertLess(time.monotonic() - started, 5)
        [(error, events)] = errors.calls
        self.assertEqual(error.code, "shutdown")
        self.assertEqual([e["id"] for e in events], ids)


if __name__ == "__main__":
    unittest.main()
