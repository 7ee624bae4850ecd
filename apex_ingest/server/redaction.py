"""Secrets in query strings: the value of every parameter named like a secret becomes
`[redacted]` in the stored `url` and `referrer`; the name stays, so analytics still see it.

apex.js applies the same rule in the browser (snippet/apex.js, `red`); the server applies
it again to every event, from any client, after validation (limits are judged on what the client
sent). docs/snippet.md ("Secrets in URLs") states the rule; keep the three in step.

The rule, on the part of the URL after its first `?` or `#` (the query and the fragment, where
OAuth puts `#access_token=...`): each `name=value` piece, delimited by `?`, `&` or `#`, whose name
(percent-decoded, case-insensitive)

- contains, once `_`, `-`, `.` and spaces are removed, one of SECRET_PARTS
  (`user_password`, `confirmPassword`, `X-Api-Key`, `access_token`, `card-number`, ...), or
- has one of SECRET_WORDS as a whole word (words split on anything but letters and digits:
  `pin`, `cc_exp`, `auth`, `x-auth`, but not `author` or `spin`), or
- is one of the project's own names (`projects create --redact-param NAME`), whole and
  case-insensitive,

keeps its name and gets the value `[redacted]`. Empty values stay empty.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import unquote

from apex_ingest.common.limits import MAX_URL_CHARS

REDACTED = "[redacted]"
#: A site's pages (and referrers) repeat from one event to the next, so each URL is judged once
#: (here, and in validation.py): URLs come from clients, so only short ones are kept, and only
#: so many.
CACHED_URL_CHARS = 512

#: Substrings of a name (lower case, without `_ - .` and spaces) that make it a secret.
SECRET_PARTS = (
    "passw",  # password, passwd, passwort
    "pwd",
    "secret",  # secret, client_secret
    "token",  # token, access_token, refresh_token, id_token, csrf_token
    "apikey",  # api_key, apikey, x-api-key
    "privatekey",
    "sessionid",  # session_id, jsessionid, phpsessid is not: add it per project
    "creditcard",
    "cardnum",  # card_number, cardnumber
    "ccnum",
    "cvv",
    "cvc",
)
#: Whole words of a name (split on anything but letters and digits) that make it a secret.
SECRET_WORDS = frozenset(
    {"pass", "pin", "auth", "authorization", "card", "cc", "csc", "ssn", "sig", "signature"}
)

_PIECE = re.compile(r"([?&#])([^=&#?]*)=([^&#]*)")
_NOT_WORD = re.compile(r"[^a-z0-9]+")
_SEPARATORS = re.compile(r"[\s_.\-]+")


def normalize_names(names: Iterable[str]) -> frozenset[str]:
    """A project's extra names as they are matched: lower case, surrounding spaces dropped."""
    return frozenset(name.strip().lower() for name in names if name.strip())


def is_secret_name(name: str, extra: frozenset[str] = frozenset()) -> bool:
    decoded = unquote(name.replace("+", " ")).strip().lower()
    if decoded in extra:
        return True
    squeezed = _SEPARATORS.sub("", decoded)
    if any(part in squeezed for part in SECRET_PARTS):
        return True
    return any(word in SECRET_WORDS for word in _NOT_WORD.split(decoded))


def redact_url(url: str, extra: frozenset[str] = frozenset()) -> str:
    """`url` with the values of its secret-named parameters replaced by `[redacted]`, cut to
    MAX_URL_CHARS (a short secret replaced by the longer marker must still fit the column)."""
    if "?" not in url and "#" not in url:
        return url
    return _redact_cached(url, extra) if len(url) <= CACHED_URL_CHARS else _redact(url, extra)


def _redact(url: str, extra: frozenset[str]) -> str:
    question, hash_mark = url.find("?"), url.find("#")
    start = question if hash_mark < 0 or 0 <= question < hash_mark else hash_mark
    query = url[start:]
    # Most URLs hold no secret: look before rebuilding the string.
    if not any(piece[3] and _is_secret(piece[2], extra) for piece in _PIECE.finditer(query)):
        return url[:MAX_URL_CHARS]

    def replace(match: re.Match[str]) -> str:
        if match[3] and _is_secret(match[2], extra):
            return f"{match[1]}{match[2]}={REDACTED}"
        return match[0]

    return (url[:start] + _PIECE.sub(replace, query))[:MAX_URL_CHARS]


_redact_cached = lru_cache(maxsize=4096)(_redact)


def _is_secret(name: str, extra: frozenset[str]) -> bool:
    # Parameter names repeat from one event to the next (utm_source, q, ref, ...): each is
    # judged once. Names come from clients: only short ones are kept, and only so many.
    return _is_secret_cached(name, extra) if len(name) <= 64 else is_secret_name(name, extra)


@lru_cache(maxsize=4096)
def _is_secret_cached(name: str, extra: frozenset[str]) -> bool:
    return is_secret_name(name, extra)
