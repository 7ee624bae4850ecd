"""How `gateway/serve.py` sizes granian from the environment."""

from __future__ import annotations

import pytest

from gateway.serve import _threads_per_worker


def test_threads_default_to_granians(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APEX_HTTP_THREADS", raising=False)
    assert _threads_per_worker() is None
    monkeypatch.setenv("APEX_HTTP_THREADS", " ")
    assert _threads_per_worker() is None


def test_threads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APEX_HTTP_THREADS", " 8 ")
    assert _threads_per_worker() == 8


@pytest.mark.parametrize("raw", ["0", "-4", "eight", "2.5"])
def test_threads_reject_nonsense(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("APEX_HTTP_THREADS", raw)
    with pytest.raises(ValueError, match="APEX_HTTP_THREADS"):
        _threads_per_worker()
