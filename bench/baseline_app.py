"""The baseline: a bare Flask JSON endpoint (parse the body, answer JSON), nothing else."""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

app = Flask(__name__)


@app.post("/api/events")
def events() -> Response:
    body = request.get_json(force=True)
    return jsonify(received=1 if "events" not in body else len(body["events"]))
