"""``Apex.identify`` and ``Apex.alias``: the events they build (issue #18)."""

from __future__ import annotations

import unittest
from typing import Any

from fake_ingest import FakeIngest

from apex_ingest_sdk import Apex


def client(fake: FakeIngest, **kwargs: Any) -> Apex:
    options: dict[str, Any] = {"flush_interval": 60.0, "transport": fake.transport}
    options.update(kwargs)
    return Apex("pk_test", "http://ingest.test", **options)


class Identity(unittest.TestCase):
    def setUp(self) -> None:
        self.fake = FakeIngest()

    def test_identify_sends_the_user_the_visitor_and_the_traits(self) -> None:
        apex = client(self.fake)
        event_id = apex.identify("u_42", {"plan": "pro", "seats": 3}, visitor_id="v_1")
        apex.close()
        [request] = self.fake.requests
        [event] = request.json["events"]
        self.assertEqual(event["userId"], "u_42")
        self.assertEqual(event["id"], event_id)
        self.assertEqual(event["type"], "identify")
        self.assertEqual(event["visitorId"], "v_1")
        self.assertEqual(event["data"], {"plan": "pro", "seats": 3})
        self.assertNotIn("url", event)  # identify needs none
        self.assertIn("timestamp", event)

    def test_alias_sends_the_previous_id(self) -> None:
        apex = client(self.fake)
        apex.alias("anon_7", "u_7", url="/signup")
        apex.close()
        [request] = self.fake.requests
        [event] = request.json["events"]
        self.assertEqual(
            (event["type"], event["userId"], event["previousId"], event["url"]),
            ("alias", "u_7", "anon_7", "/signup"),
        )
        self.assertNotIn("data", event)

    def test_identify_batches_with_other_events(self) -> None:
        apex = client(self.fake)
        apex.track("pageview", "/", user_id="u_1")
        apex.identify("u_1", visitor_id="v")
        apex.track("pageview", "/", user_id="u_2")
        apex.close()
        [request] = self.fake.requests
        users = [(e["type"], e["userId"]) for e in request.json["events"]]
        self.assertEqual(users, [("pageview", "u_1"), ("identify", "u_1"), ("pageview", "u_2")])

    def test_bad_arguments_raise_at_once(self) -> None:
        apex = client(self.fake)
        with self.assertRaises(ValueError):
            apex.identify("")
        with self.assertRaises(ValueError):
            apex.alias("", "u")
        with self.assertRaises(ValueError):
            apex.alias("p", "")
        with self.assertRaises(TypeError):
            apex.identify("u", traits=[1, 2])  # type: ignore[arg-type]
        with self.assertRaises(TypeError):
            apex.identify("u", visitor_id=5)  # type: ignore[arg-type]
        apex.close()
        self.assertEqual(self.fake.requests, [])


if __name__ == "__main__":
    unittest.main()
