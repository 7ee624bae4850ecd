"""`projects create --ip-mode/--drop-bots` and `projects update` (issue #19)."""

from __future__ import annotations

from tests.server.test_cli import run


def test_projects_carry_their_ip_mode_and_bot_dropping(sqlite_url: str) -> None:
    key = run(sqlite_url, "projects", "create", "shop", "--ip-mode", "truncated", "--drop-bots")
    key_text = key.stdout.strip()
    listed = run(sqlite_url, "projects", "list").stdout
    assert "ip_mode=truncated" in listed and "drop_bots" in listed
    updated = run(
        sqlite_url, "projects", "update", "--project", key_text, "--ip-mode", "none", "--keep-bots"
    )
    assert updated.stdout.endswith(": ip mode = none\nproject 1: bots = stored, flagged is_bot\n")
    listed = run(sqlite_url, "projects", "list").stdout
    assert "ip_mode=none" in listed and "drop_bots" not in listed
    # Nothing to change, or a mode that does not exist: refused, the project unchanged.
    assert run(sqlite_url, "projects", "update", "--project", "shop", check=False).returncode == 2
    bad = run(
        sqlite_url, "projects", "update", "--project", "shop", "--ip-mode", "half", check=False
    )
    assert bad.returncode == 2 and "half" in bad.stderr
    assert "ip_mode=none" in run(sqlite_url, "projects", "list").stdout
    # A project created without the options keeps what the server always did.
    run(sqlite_url, "projects", "create", "other")
    other = [
        line for line in run(sqlite_url, "projects", "list").stdout.splitlines() if "other" in line
    ]
    assert other and "ip_mode" not in other[0]
