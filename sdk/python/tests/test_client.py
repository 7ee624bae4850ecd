"""``Apex``'s public API: what ``track`` builds, argument and host checks, the package itself."""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import re
import subprocess
import sys
import unittest
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from fake_ingest import FakeIngest

import apex_ingest_sdk
from apex_ingest_sdk import Apex
from apex_ingest_sdk.client import events_url, format_timestamp, new_event_id

HEX_ID = re.compile(r"^[0-9a-f]{32}$")


def client(fake: FakeIngest, **kwargs: Any) -> Apex:
    options: dict[str, Any] = {"flush_interval": 60.0, "transport": fake.transport}
    options.update(kwargs)
    return Apex("pk_test", "http://ingest.test", **options)


class Track(unittest.TestCase):
    def setUp(self) -> None:
        self.fake = FakeIngest()

    def test_batch_is_json_with_an_id_per_event(self) -> None:
        apex = client(self.fake)
        ids = [apex.track("pageview", f"/p/{i}", {"n": i}, visitor_id="v1") for i in range(3)]
        self.assertTrue(apex.flush(5))
        apex.close()

        [request] = self.fake.requests
        self.assertEqual(request.raw[:2], b"\x1f\x8b")  # gzip
        self.assertEqual(request.json["projectKey"], "pk_test")
        self.assertNotIn("userId", request.json)
        self.assertEqual(request.ids, ids)
        # One id format across Apex: 32 lowercase hex characters, a uuid4 without dashes.
        for event_id in ids:
            self.assertRegex(event_id, HEX_ID)
        self.assertEqual(len(set(ids)), 3)
        first = request.json["events"][0]
        self.assertEqual(
            (first["type"], first["url"], first["data"]), ("pageview", "/p/0", {"n": 0})
        )
        self.assertEqual(first["visitorId"], "v1")
        # Stamped at track time, with an offset: the batch leaves seconds later.
        stamped = datetime.fromisoformat(first["timestamp"])
        self.assertEqual(stamped.utcoffset(), timedelta(0))
        self.assertLess(abs((datetime.now(UTC) - stamped).total_seconds()), 10)

    def test_new_event_ids_are_uuid4_hex(self) -> None:
        ids = {new_event_id() for _ in range(1000)}
        self.assertEqual(len(ids), 1000)
        for event_id in ids:
            self.assertRegex(event_id, HEX_ID)
            self.assertEqual(event_id[12], "4")  # version 4

    def test_caller_supplied_id_and_timestamp_are_kept(self) -> None:
        apex = client(self.fake)
        when = datetime(2024, 5, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
        self.assertEqual(apex.track("click", "/x", id="my-id", timestamp=when), "my-id")
        apex.close()
        event = self.fake.requests[0].json["events"][0]
        self.assertEqual(event["id"], "my-id")
        self.assertEqual(event["timestamp"], "2024-05-01T12:30:00+02:00")

    def test_timestamps_are_rfc3339_with_offset_and_naive_means_utc(self) -> None:
        self.assertEqual(
            format_timestamp(datetime(2024, 1, 2, 3, 4, 5)), "2024-01-02T03:04:05+00:00"
        )
        self.assertEqual(
            format_timestamp(datetime(2024, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)),
            "2024-01-02T03:04:05.600000+00:00",
        )
        self.assertEqual(format_timestamp(0), "1970-01-01T00:00:00+00:00")
        self.assertEqual(format_timestamp("2024-01-02T03:04:05Z"), "2024-01-02T03:04:05Z")
        with self.assertRaises(TypeError):
            format_timestamp(True)

    def test_data_is_snapshotted_when_tracked(self) -> None:
        apex = client(self.fake)
        data: dict[str, Any] = {"items": [1]}
        apex.track("cart", "/cart", data)
        data["items"].append(2)
        apex.close()
        self.assertEqual(self.fake.requests[0].json["events"][0]["data"], {"items": [1]})

    def test_numbers_and_unicode_round_trip_exactly(self) -> None:
        apex = client(self.fake)
        apex.track("n", "/", {"int": 3, "big": 9007199254740993, "float": 3.5, "text": "zürich ✓"})
        apex.close()
        body = self.fake.requests[0].body.decode()
        self.assertIn('"int":3,', body)
        self.assertIn('"big":9007199254740993', body)
        self.assertIn("zürich ✓", body)
        self.assertEqual(json.loads(body)["events"][0]["data"]["float"], 3.5)

    def test_bad_arguments_raise_at_track_time(self) -> None:
        apex = client(self.fake)
        with self.assertRaises(TypeError):
            apex.track("t", "/", ["not", "an", "object"])  # type: ignore[arg-type]
        with self.assertRaises(ValueError):
            apex.track("t", "/", {"x": float("nan")})
        with self.assertRaises(TypeError):
            apex.track("t", "/", {"x": object()})
        with self.assertRaises(TypeError):
            apex.track(None, "/")  # type: ignore[arg-type]
        with self.assertRaises(TypeError):
            apex.track("t", "/", id=5)  # type: ignore[arg-type]
        self.assertEqual(apex.pending, 0)
        apex.close()
        self.assertEqual(self.fake.requests, [])


class Construction(unittest.TestCase):
    def test_constructor_validates_limits(self) -> None:
        cases: list[dict[str, Any]] = [
            {"max_batch": 501},
            {"max_batch": 0},
            {"max_queue": 0},
            {"flush_interval": 0},
            {"max_retries": -1},
            {"timeout": 0},
        ]
        for kwargs in cases:
            with self.subTest(**kwargs), self.assertRaises(ValueError):
                Apex("pk", **kwargs)
        with self.assertRaises(ValueError):
            Apex("", "http://x")

    def test_host_becomes_the_events_url(self) -> None:
        cases = {
            "http://127.0.0.1:8080": "http://127.0.0.1:8080/api/events",
            "http://127.0.0.1:8080/": "http://127.0.0.1:8080/api/events",
            "https://ingest.example.com": "https://ingest.example.com/api/events",
            "HTTPS://Ingest.Example.com:443": "https://Ingest.Example.com:443/api/events",
            "http://[::1]:8080": "http://[::1]:8080/api/events",
            " http://localhost:8080 ": "http://localhost:8080/api/events",
        }
        for host, url in cases.items():
            with self.subTest(host=host):
                self.assertEqual(events_url(host), url)
                self.assertEqual(Apex("pk", host).url, url)

    def test_host_mistakes_fail_at_construction(self) -> None:
        cases = {
            "127.0.0.1:8080": "has no scheme",
            "localhost": "has no scheme",
            "ingest.example.com/api/events": "has no scheme",
            "ftp://ingest.example.com": "scheme must be http or https",
            "ws://ingest.example.com": "scheme must be http or https",
            "http://127.0.0.1:8080/api/events": "already ends in /api/events",
            "https://ingest.example.com/api/events/": "already ends in /api/events",
            "http://ingest.example.com/ingest": "has a path",
            "http://ingest.example.com?key=1": "query or fragment",
            "http://ingest.example.com/#top": "query or fragment",
            "http://": "no host name",
            "http://127.0.0.1:port": "127.0.0.1:port",
            "": "host is empty",
        }
        for host, message in cases.items():
            with self.subTest(host=host):
                with self.assertRaises(ValueError) as caught:
                    Apex("pk", host)
                self.assertIn(message, str(caught.exception))
        with self.assertRaises(TypeError):
            Apex("pk", None)  # type: ignore[arg-type]

    def test_the_no_scheme_error_suggests_the_fix(self) -> None:
        with self.assertRaises(ValueError) as caught:
            Apex("pk", "127.0.0.1:8080")
        self.assertIn("'http://127.0.0.1:8080'", str(caught.exception))


class Package(unittest.TestCase):
    def test_public_names(self) -> None:
        for name in apex_ingest_sdk.__all__:
            if name in apex_ingest_sdk._LAZY:
                continue  # lazy, and needs the grpc extra
            self.assertTrue(hasattr(apex_ingest_sdk, name), name)
        self.assertEqual(apex_ingest_sdk.__version__, "0.1.0")
        with self.assertRaises(AttributeError):
            apex_ingest_sdk.Nope  # noqa: B018

    def test_importing_apex_loads_neither_grpc_nor_the_server(self) -> None:
        code = (
            "import sys\n"
            "from apex_ingest_sdk import Apex\n"
            "heavy = [m for m in ('grpc', 'google.protobuf', 'apex_ingest') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

    def test_typed_and_generated_files_are_installed(self) -> None:
        files = importlib.resources.files("apex_ingest_sdk")
        self.assertTrue(files.joinpath("py.typed").is_file())
        self.assertTrue(files.joinpath("_proto", "ingest_pb2.py").is_file())
        self.assertTrue(files.joinpath("_proto", "ingest_pb2.pyi").is_file())

    @unittest.skipIf(importlib.util.find_spec("grpc") is not None, "grpcio is installed")
    def test_grpc_client_without_the_extra_says_what_to_install(self) -> None:
        with self.assertRaises(ImportError) as caught:
            apex_ingest_sdk.IngestClient  # noqa: B018
        self.assertIn("apex-ingest-sdk[grpc]", str(caught.exception))


if __name__ == "__main__":
    unittest.main()
