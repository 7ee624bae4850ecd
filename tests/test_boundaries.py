"""The boundaries import-linter checks statically (pyproject.toml), checked at run time too."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("gateway.wsgi", ("sqlalchemy", "psycopg", "alembic", "apex_ingest.server")),
        ("apex_ingest.common.settings", ("sqlalchemy", "flask", "grpc")),
        ("apex_ingest.server.server", ("flask", "gateway", "granian")),
    ],
)
def test_importing_a_part_loads_nothing_it_must_not(module: str, absent: tuple[str, ...]) -> None:
    script = (
        f"import sys, {module}\n"
        f"loaded = [name for name in {absent!r} if name in sys.modules]\n"
        "print(','.join(loaded))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "", f"{module} loads {result.stdout.strip()}"


def test_the_readmes_layout_matches_the_tree() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([^`]+)` \|", layout, re.MULTILINE)
    for path in listed:
        assert (root / path).exists(), f"README lists {path}, which does not exist"
    packages = {
        f"apex_ingest/{child.name}/"
        for child in (root / "apex_ingest").iterdir()
        if (child / "__init__.py").exists()
    }
    assert packages <= set(listed), f"not in the README's layout: {packages - set(listed)}"
