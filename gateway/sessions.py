"""The gateway keeps no sessions: no request reads or writes a cookie session.

Flask opens a cookie session for every request (and, with no SECRET_KEY, builds a new null
session each time); here every request gets the same read-only null session instead, and
nothing is ever saved.
"""

from __future__ import annotations

from flask import Flask, Request, Response
from flask.sessions import NullSession, SessionInterface, SessionMixin

_NULL = NullSession()


class NoSessions(SessionInterface):
    def open_session(self, app: Flask, request: Request) -> SessionMixin:
        return _NULL

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        return None
