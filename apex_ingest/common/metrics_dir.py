"""PROMETHEUS_MULTIPROC_DIR for a tree of server processes.

Kept apart from apex_ingest.common.metrics on purpose: prometheus-client decides at import time
whether it runs in multiprocess mode, so the directory must be set before it is imported.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from apex_ingest.common.settings import Internal

MULTIPROC_ENV = Internal.PROMETHEUS_MULTIPROC_DIR


def prepare_multiprocess_dir() -> str:
    """Give this process tree a fresh PROMETHEUS_MULTIPROC_DIR, unless one is configured.

    Child processes inherit the variable. A directory made here is removed when this process
    exits; a configured one is the operator's to empty between runs (prometheus-client's rule).
    """
    existing = Internal.get(MULTIPROC_ENV)
    if existing:
        os.makedirs(existing, exist_ok=True)
        return existing
    directory = tempfile.mkdtemp(prefix="apex-metrics-")
    Internal.set(MULTIPROC_ENV, directory)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory
