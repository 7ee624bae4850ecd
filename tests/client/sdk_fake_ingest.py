"""The SDK's fake of ``POST /api/events`` (``sdk/python/tests/fake_ingest.py``), importable here.

The fake lives with the SDK's standard-library tests; this module loads it from there so that
the repository's tests can check its answers against the gateway's contract
(``test_sdk_fake_contract.py``) and use it where a scripted gateway is needed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PATH = Path(__file__).resolve().parents[2] / "sdk" / "python" / "tests" / "fake_ingest.py"
_NAME = "apex_sdk_fake_ingest"


def _load() -> ModuleType:
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    spec = importlib.util.spec_from_file_location(_NAME, PATH)
    assert spec is not None and spec.loader is not None, PATH
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


fake = _load()

CODES: dict[int, str] = fake.CODES
RETRY_STATUSES: frozenset[int] = fake.RETRY_STATUSES
Answer = fake.Answer
FakeIngest = fake.FakeIngest
Received = fake.Received
fake_ingest = fake.fake_ingest
foreign = fake.foreign
ok = fake.ok
refuse = fake.refuse
