"""apex.js as a file and as the gateway serves it: size budget, syntax level, caching headers.

The gateway serves gateway/static/apex.js, built from snippet/apex.js by `make snippet`; the
browser tests run the built file.
"""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from flask.testing import FlaskClient

from gateway.app import create_app
from gateway.snippet import SNIPPET
from tests.browser.support import APEX_JS

SOURCE = APEX_JS.parents[2] / "snippet" / "apex.js"

#: The budget stated in the README and docs/snippet.md.
#: 4 KiB: the outage-proof send queue (issue #17) cost about 240 bytes; identify/reset (#18),
#: consent, cookieless mode and sentAt (#19) about 500 together.
GZIP_BUDGET = 4096


@pytest.fixture
def client() -> FlaskClient:
    return create_app().test_client()


def test_gzip_size_is_within_budget() -> None:
    size = len(gzip.compress(APEX_JS.read_bytes(), compresslevel=9))
    assert size < GZIP_BUDGET, f"apex.js is {size} bytes gzipped, over the {GZIP_BUDGET} budget"


def test_the_served_file_is_what_the_source_builds_to() -> None:
    """An edit to one without the other (`make snippet` rebuilds) fails here."""
    build = Path(__file__).resolve().parents[2] / "snippet" / "build.py"
    result = subprocess.run(
        [sys.executable, str(build), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert APEX_JS.stat().st_size < 0.85 * SOURCE.stat().st_size, "built without comments"


@pytest.mark.parametrize("path", [SOURCE, APEX_JS], ids=["source", "built"])
def test_no_syntax_newer_than_es2017(path: Path) -> None:
    """A cheap guard against the common post-ES2017 syntax (the file is small and regex-free
    where these could appear legitimately)."""
    source = path.read_text(encoding="utf-8")
    assert not re.search(r"\?\.(?!\d)", source), "optional chaining is ES2020"
    assert "??" not in source, "nullish coalescing is ES2020"
    assert not re.search(r"catch\s*\{", source), "optional catch binding is ES2019"
    assert not re.search(r"\{\s*\.\.\.", source), "object spread is ES2018"


def test_served_as_javascript_with_caching_headers(client: FlaskClient) -> None:
    response = client.get("/apex.js", headers={"Accept-Encoding": "identity"})

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert response.data == SNIPPET == APEX_JS.read_bytes()
    assert response.headers["Cache-Control"] == "public, max-age=3600"
    etag = response.headers["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag), "a strong ETag"
    assert "Content-Encoding" not in response.headers


def test_if_none_match_gives_304(client: FlaskClient) -> None:
    etag = client.get("/apex.js").headers["ETag"]
    for validator in (etag, "W/" + etag, f'"stale", {etag}', "*"):
        response = client.get("/apex.js", headers={"If-None-Match": validator})
        assert response.status_code == 304, validator
        assert response.data == b""
        assert response.headers["ETag"] == etag
        assert response.headers["Cache-Control"] == "public, max-age=3600"

    assert client.get("/apex.js", headers={"If-None-Match": '"stale"'}).status_code == 200


def test_gzip_when_accepted(client: FlaskClient) -> None:
    plain = client.get("/apex.js")
    zipped = client.get("/apex.js", headers={"Accept-Encoding": "br, gzip;q=0.8"})

    assert zipped.headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in zipped.headers["Vary"]
    assert gzip.decompress(zipped.data) == SNIPPET
    assert len(zipped.data) < GZIP_BUDGET
    # Another representation, another strong validator; each revalidates to a 304.
    assert zipped.headers["ETag"] != plain.headers["ETag"]
    again = client.get(
        "/apex.js",
        headers={"Accept-Encoding": "gzip", "If-None-Match": zipped.headers["ETag"]},
    )
    assert again.status_code == 304
    refused = client.get("/apex.js", headers={"Accept-Encoding": "gzip;q=0"})
    assert "Content-Encoding" not in refused.headers


def test_the_running_service_serves_it(gateway_url: str) -> None:
    """Through `python -m apex_ingest serve`: the blueprint is registered in create_app."""
    response = requests.get(f"{gateway_url}/apex.js", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert response.content == SNIPPET
    cached = requests.get(
        f"{gateway_url}/apex.js", headers={"If-None-Match": response.headers["ETag"]}, timeout=10
    )
    assert cached.status_code == 304
