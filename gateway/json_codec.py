"""JSON in and out with orjson, keeping every number of the client's text digit for digit.

orjson is fast, but it reads an integer beyond 64 bits or a decimal with more digits than a
double keeps as a float, silently changing its value, and it writes floats in its own shortest
form (49.90 comes back as 49.9, 1e5 as 100000.0). Event ``data`` must be stored exactly as
sent, so a body holding a number orjson might not give back verbatim takes a slower exact
path: the standard library parser hands over each number's text, kept as an orjson.Fragment
that orjson then writes verbatim.

Request bodies normally take the faster msgspec path in gateway.payload.parse_request, which
keeps each event's `data` as its raw bytes; parse() is its fallback for bodies of another shape
and for the exact wording of syntax errors.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

import orjson
from flask import Response
from flask.json.provider import JSONProvider

#: A number token (after ``:``, ``,`` or ``[``) that orjson might not give back verbatim: one
#: with a fraction or an exponent, 16 or more digits (beyond what a double holds exactly, and
#: orjson turns integers past 64 bits into floats), or a negative zero. Integers are common
#: and safe, so integer-only bodies keep the fast path. It can also match inside a string (a
#: time like "12:00:00.5"); that only costs the exact path, never correctness.
_AT_RISK = re.compile(rb"[:,\[]\s*(?:-?[0-9]+[.eE]|-?[0-9]{16}|-0(?![0-9]))")

_BOM = b"\xef\xbb\xbf"


class JSONSyntaxError(ValueError):
    """The body is not JSON we can accept: a syntax error, NaN, invalid UTF-8, too deep."""


class JSONTooDeep(JSONSyntaxError):
    """Nested deeper than a parser or writer here goes (MAX_READ_DEPTH): maybe valid JSON."""


_TOO_DEEP = "the JSON is nested too deeply"


#: The fewest levels a parser or writer here refuses (orjson writes 254; it reads 1024): a body
#: refused as too deep has a value nested deeper than this.
MAX_READ_DEPTH = 254
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\],]', re.DOTALL)


def nesting_path(body: bytes, limit: int = MAX_READ_DEPTH) -> list[str | int] | None:
    """The keys and indexes leading to the first value nested deeper than `limit` levels, or
    None. Reads tokens only (strings skipped whole), so it finds the place even in a body that
    no parser here reads, to name the offending field."""
    # Per open container: [is an object, the key or index of the value being read in it].
    stack: list[list[Any]] = []
    key_next = False
    for match in _TOKEN.finditer(body):
        token = match.group()
        if token[:1] == b'"':
            if key_next and stack:
                try:
                    stack[-1][1] = json.loads(token)
                except ValueError:
                    stack[-1][1] = token[1:-1].decode("utf-8", "replace")
                key_next = False
        elif token in (b"{", b"["):
            if len(stack) >= limit:
                return [entry[1] for entry in stack]
            stack.append([token == b"{", None if token == b"{" else 0])
            key_next = token == b"{"
        elif token in (b"}", b"]"):
            if stack:
                stack.pop()
        elif stack:  # a comma
            if stack[-1][0]:
                key_next = True
            else:
                stack[-1][1] += 1
    return None


def _reject_constant(name: str) -> NoReturn:
    raise JSONSyntaxError(f"{name} is not valid JSON")


def _number_text(text: str) -> orjson.Fragment:
    return orjson.Fragment(text)


def parse(body: bytes) -> Any:
    """Parse a JSON document; numbers at risk come back as orjson.Fragment holding their text.

    Raises JSONSyntaxError for anything that is not strict JSON (RFC 8259, UTF-8).
    """
    if body.startswith(_BOM):
        # RFC 8259 lets a parser ignore a BOM; some Windows tools write one.
        body = body[len(_BOM) :]
    if _AT_RISK.search(body) is None:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            if exc.msg.startswith("depth limit exceeded"):
                raise JSONTooDeep(str(exc)) from None
            raise JSONSyntaxError(str(exc)) from None
    return _parse_exact(body)


def _parse_exact(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
        value = json.loads(
            text,
            parse_int=_number_text,
            parse_float=_number_text,
            parse_constant=_reject_constant,
        )
        # The standard library accepts lone surrogates ("\ud800") that no UTF-8 store can hold;
        # serializing once rejects them (and absurd depth) just as orjson's own parser would.
        orjson.dumps(value)
    except JSONSyntaxError:
        raise
    except UnicodeDecodeError:
        raise JSONSyntaxError("the body is not valid UTF-8") from None
    except RecursionError:
        raise JSONTooDeep(_TOO_DEEP) from None
    except orjson.JSONEncodeError as exc:
        raise _encode_error(exc) from None
    except ValueError as exc:
        raise JSONSyntaxError(str(exc)) from None
    return value


def _encode_error(exc: orjson.JSONEncodeError) -> JSONSyntaxError:
    text = str(exc)
    if "surrogates" in text:
        return JSONSyntaxError("a string holds an unpaired UTF-16 surrogate")
    if "Recursion" in text:
        return JSONTooDeep(_TOO_DEEP)
    return JSONSyntaxError(text)


def dumps(value: Any) -> bytes:
    """Serialize compactly; Fragment numbers from parse() come out exactly as they came in.

    Raises JSONSyntaxError when ``value`` nests deeper than orjson writes (254 levels).
    """
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise _encode_error(exc) from None


def json_response(body: Any, status: int = 200) -> Response:
    """`body` as a JSON answer whose WSGI body is the list of its one bytes object.

    direct_passthrough hands that list to the server as it is, instead of werkzeug's
    ClosingIterator: granian sends a list in one call, an iterator chunk by chunk through a
    channel (~17 µs more per request under load: 1.03x snippet requests/s, bench/README.md).
    The price: the server never calls the response's close(), so a response that registers
    call_on_close must turn it off again (gateway.errors does).
    """
    return Response(
        orjson.dumps(body), status=status, mimetype="application/json", direct_passthrough=True
    )


class OrjsonProvider(JSONProvider):
    """Flask's JSON (jsonify, request.get_json) through orjson, so all JSON uses one codec."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return orjson.dumps(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        return json_response(obj)
