"""``ApexError``: codes from the gateway's answers, Retry-After, text and pickling."""

from __future__ import annotations

import email.utils
import pickle
import time
import unittest

from fake_ingest import CODES, refuse

from apex_ingest_sdk import ApexError
from apex_ingest_sdk.errors import SERVER_CODES, error_from_response, parse_retry_after


class Codes(unittest.TestCase):
    def test_the_sdk_knows_every_code_the_fake_gateway_sends(self) -> None:
        self.assertEqual(dict(SERVER_CODES), CODES)

    def test_gateway_answers_keep_their_code_message_and_details(self) -> None:
        answer = refuse(400, "The request has 1 invalid field.", ("events[1].url", "bad"))
        error = error_from_response(answer.status, None, answer.body)
        self.assertEqual((error.status, error.code), (400, "invalid_request"))
        self.assertEqual(error.message, "The request has 1 invalid field.")
        self.assertEqual(error.field_violations, [("events[1].url", "bad")])
        self.assertIsNone(error.retry_after)

    def test_an_answer_that_is_not_the_gateways_gets_its_status_code(self) -> None:
        for status, code in ((502, "bad_gateway"), (503, "unavailable"), (504, "timeout")):
            error = error_from_response(status, None, b"<html><h1>Oops</h1></html>")
            self.assertEqual((error.status, error.code), (status, code))
            self.assertIn("Oops", error.message)
        error = error_from_response(302, None, b"")
        self.assertEqual((error.code, error.message), ("http_302", "Found"))
        error = error_from_response(418, None, b'{"error": "nope"}')
        self.assertEqual(error.code, "http_418")


class RetryAfter(unittest.TestCase):
    def test_seconds_and_http_dates(self) -> None:
        self.assertIsNone(parse_retry_after(None))
        self.assertIsNone(parse_retry_after(""))
        self.assertIsNone(parse_retry_after("soon"))
        self.assertEqual(parse_retry_after("3"), 3.0)
        self.assertEqual(parse_retry_after(" 1.5 "), 1.5)
        self.assertEqual(parse_retry_after("-4"), 0.0)
        later = email.utils.formatdate(time.time() + 30, usegmt=True)
        seconds = parse_retry_after(later)
        assert seconds is not None
        self.assertTrue(25 <= seconds <= 31, seconds)
        past = email.utils.formatdate(time.time() - 30, usegmt=True)
        self.assertEqual(parse_retry_after(past), 0.0)


class Text(unittest.TestCase):
    def test_str_repr_and_pickle(self) -> None:
        error = ApexError(
            "invalid events",
            code="invalid_request",
            status=400,
            field_violations=[("events[0].url", "bad")],
            retry_after=None,
        )
        self.assertEqual(
            str(error), "HTTP 400 invalid_request: invalid events (events[0].url: bad)"
        )
        self.assertIn("invalid_request", repr(error))
        copy = pickle.loads(pickle.dumps(error))
        self.assertEqual(
            (copy.message, copy.code, copy.status, copy.field_violations),
            (error.message, error.code, error.status, error.field_violations),
        )
        self.assertEqual(str(ApexError("full", code="queue_full")), "queue_full: full")


if __name__ == "__main__":
    unittest.main()
