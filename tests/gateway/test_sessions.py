"""The gateway keeps no cookie sessions (gateway/sessions.py)."""

from __future__ import annotations

import flask
import pytest
from flask.sessions import NullSession

from tests.gateway.conftest import closed_port_target, fake_app


def test_every_request_gets_the_read_only_null_session_and_no_cookie() -> None:
    app = fake_app(closed_port_target())
    seen: list[object] = []

    @app.get("/test-session")
    def look() -> str:
        seen.append(flask.session._get_current_object())  # type: ignore[attr-defined]
        with pytest.raises(RuntimeError):  # NullSession refuses writes
            flask.session["user"] = "x"
        return "ok"

    client = app.test_client()
    for _ in range(2):
        response = client.get("/test-session")
        assert response.status_code == 200
        assert "Set-Cookie" not in response.headers
    assert len(seen) == 2
    assert isinstance(seen[0], NullSession)
    assert seen[0] is seen[1]  # one shared null session, none built per request
