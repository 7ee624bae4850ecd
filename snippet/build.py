"""Build gateway/static/apex.js, the snippet as it ships, from snippet/apex.js: `make snippet`.

The source keeps its comments and layout; the shipped file is the same code with comments and
whitespace removed by rjsmin (it renames nothing and keeps the leading `/*! ... */` notice),
about 600 bytes less gzipped against the snippet's 4 KiB budget. `--check` (run by `make lint`
and tests/browser/test_apex_js_served.py) fails when the committed file is not what the source
builds to.
"""

from __future__ import annotations

import sys
from pathlib import Path

import rjsmin

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "snippet" / "apex.js"
BUILT = ROOT / "gateway" / "static" / "apex.js"


def build(source: str) -> str:
    minified: str = rjsmin.jsmin(source, keep_bang_comments=True)
    return minified + "\n"


def main(argv: list[str]) -> int:
    built = build(SOURCE.read_text(encoding="utf-8"))
    if "--check" in argv:
        if BUILT.read_text(encoding="utf-8") != built:
            print(f"{BUILT.relative_to(ROOT)} is out of date: run 'make snippet' and commit")
            return 1
        return 0
    BUILT.write_text(built, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
