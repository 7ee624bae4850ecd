"""What `apex-ingest projects update` can change: one table, one row per setting.

Each row names its command-line options and how they change a project; the command attaches
every row's options and applies the rows whose options were given, in one transaction. A new
per-project setting is one more row (and its column): nothing else in the command changes.

The servers read projects through `ProjectDirectory`, whose answers are cached for
APEX_PROJECT_CACHE_TTL seconds: a change takes effect within that time on every running server,
without a restart (and the gateway picks up a new rate limit with the next answer it gets).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # the command imports this table at start: no SQLAlchemy until a row is applied
    from apex_ingest.server.models import Project


class SettingError(click.BadParameter):
    """A value the setting cannot take (names the option)."""


@dataclass(frozen=True)
class ProjectSetting:
    """One setting of a project that `projects update` changes."""

    #: What the change report calls it.
    name: str
    #: The command-line options of this setting (their `name`s are the keys of `values`).
    options: Sequence[click.Option]
    #: Applies the given option values to the project; returns a description of the new value,
    #: or None when none of this setting's options was given.
    apply: Callable[[Project, Mapping[str, Any]], str | None]


def _given(values: Mapping[str, Any], *names: str) -> bool:
    return any(values.get(name) not in (None, (), False) for name in names)


def _without(
    kept: set[str], removed: set[str], what: str, option: str, current: Sequence[str]
) -> set[str]:
    """`kept` less `removed`, every one of which must be there or in the project's `current`
    list (which a new list may replace): a mistyped name would otherwise change nothing and
    still be reported as the new setting."""
    absent = removed - kept - set(current)
    if absent:
        raise SettingError(
            f"not {what} of this project: {', '.join(sorted(absent))}", param_hint=option
        )
    return kept - removed


def _origins(values: Mapping[str, Any], current: Sequence[str]) -> list[str] | None:
    if not _given(values, "allowed_origins", "add_allowed_origin", "remove_allowed_origin") and (
        not values.get("any_origin")
    ):
        return None
    if values.get("any_origin") and _given(values, "allowed_origins", "add_allowed_origin"):
        raise SettingError("--any-origin cannot be given with origins to allow")

    from apex_ingest.server import projects as project_store

    def normalized(origins: Sequence[str], option: str, stored: Sequence[str] = ()) -> set[str]:
        found = set()
        for origin in origins:
            try:
                found.add(project_store.normalize_origin(origin))
            except ValueError as error:
                # An entry stored before such origins were refused (`https://*.example`) can
                # still be named to remove it.
                if origin.strip() not in stored:
                    raise SettingError(str(error), param_hint=option) from error
                found.add(origin.strip())
        return found

    if values.get("allowed_origins"):
        base = normalized(values["allowed_origins"], "--allowed-origin")
    else:
        base = set(current)
    base |= normalized(values.get("add_allowed_origin") or (), "--add-allowed-origin")
    option = "--remove-allowed-origin"
    removed = normalized(values.get("remove_allowed_origin") or (), option, current)
    kept = _without(base, removed, "an allowed origin", option, current)
    if values.get("any_origin"):
        return []
    if base and not kept:
        # An empty list allows any origin: never widen it by removing the last one silently.
        raise SettingError(
            "this removes every allowed origin, which allows any origin: "
            "pass --any-origin to say so",
            param_hint=option,
        )
    return sorted(kept)


def _apply_origins(project: Project, values: Mapping[str, Any]) -> str | None:
    origins = _origins(values, project.allowed_origins or [])
    if origins is None:
        return None
    project.allowed_origins = origins
    return ",".join(origins) or "* (any origin)"


def _apply_redact_params(project: Project, values: Mapping[str, Any]) -> str | None:
    if not _given(values, "redact_params", "add_redact_param", "remove_redact_param") and (
        not values.get("no_redact_params")
    ):
        return None

    from apex_ingest.server import projects as project_store

    def checked(names: Sequence[str], option: str) -> set[str]:
        try:
            return set(project_store.check_param_names(names))
        except project_store.InvalidParamName as error:
            raise SettingError(str(error), param_hint=option) from error

    if values.get("no_redact_params"):
        if _given(values, "redact_params", "add_redact_param"):
            raise SettingError("--no-redact-params cannot be given with names to redact")
        names: set[str] = set()
    elif values.get("redact_params"):
        names = checked(values["redact_params"], "--redact-param")
    else:
        names = set(project.redact_params or ())
    names |= checked(values.get("add_redact_param") or (), "--add-redact-param")
    option = "--remove-redact-param"
    removed = checked(values.get("remove_redact_param") or (), option)
    names = _without(names, removed, "a redacted parameter", option, project.redact_params or ())
    project.redact_params = sorted(names) or None
    return ",".join(sorted(names)) or "(only the built-in names)"


def _apply_name(project: Project, values: Mapping[str, Any]) -> str | None:
    name: str | None = values.get("name")
    if name is None:
        return None
    from sqlalchemy.orm import object_session

    from apex_ingest.server import projects as project_store

    session = object_session(project)
    assert session is not None  # loaded by the command's session
    try:
        project.name = project_store.check_name(session, name, project.id)
    except ValueError as error:  # InvalidName, NameTaken
        raise SettingError(str(error), param_hint="--name") from error
    return name


def _apply_rate_limit(project: Project, values: Mapping[str, Any]) -> str | None:
    if values.get("default_rate_limit"):
        if values.get("rate_limit") is not None:
            raise SettingError("--default-rate-limit cannot be given with --rate-limit")
        project.rate_limit = None
        return "APEX_RATE_LIMIT (the gateway's default)"
    if values.get("rate_limit") is None:
        return None
    from apex_ingest.server import projects as project_store

    try:
        project.rate_limit = project_store.check_rate_limit(values["rate_limit"])
    except project_store.InvalidRateLimit as error:
        raise SettingError(str(error), param_hint="--rate-limit") from error
    return project.rate_limit


def _apply_ip_mode(project: Project, values: Mapping[str, Any]) -> str | None:
    ip_mode: str | None = values.get("ip_mode")
    if ip_mode is None:
        return None
    project.ip_mode = ip_mode
    return ip_mode


def _apply_drop_bots(project: Project, values: Mapping[str, Any]) -> str | None:
    drop_bots: bool | None = values.get("drop_bots")
    if drop_bots is None:
        return None
    project.drop_bots = drop_bots
    return "dropped" if drop_bots else "stored, flagged is_bot"


def _apply_cookieless(project: Project, values: Mapping[str, Any]) -> str | None:
    cookieless: bool | None = values.get("cookieless")
    if cookieless is None:
        return None
    project.cookieless = cookieless
    return "on" if cookieless else "off"


SETTINGS: tuple[ProjectSetting, ...] = (
    ProjectSetting(
        "name",
        [click.Option(["--name"], default=None, help="A new name.")],
        _apply_name,
    ),
    ProjectSetting(
        "allowed origins",
        [
            click.Option(
                ["--allowed-origin", "allowed_origins"],
                multiple=True,
                help="Allow only these browser origins (repeatable): replaces the list.",
            ),
            click.Option(
                ["--add-allowed-origin"], multiple=True, help="Allow this origin too (repeatable)."
            ),
            click.Option(
                ["--remove-allowed-origin"],
                multiple=True,
                help="Stop allowing this origin (repeatable); the last one only with --any-origin.",
            ),
            click.Option(
                ["--any-origin"], is_flag=True, default=False, help="Clear the list: any origin."
            ),
        ],
        _apply_origins,
    ),
    ProjectSetting(
        "redacted parameters",
        [
            click.Option(
                ["--redact-param", "redact_params"],
                multiple=True,
                help="The project's own secret query parameter names (repeatable): replaces them.",
            ),
            click.Option(["--add-redact-param"], multiple=True, help="Redact this name too."),
            click.Option(["--remove-redact-param"], multiple=True, help="Stop redacting it."),
            click.Option(
                ["--no-redact-params"],
                is_flag=True,
                default=False,
                help="Only the built-in names.",
            ),
        ],
        _apply_redact_params,
    ),
    ProjectSetting(
        "rate limit",
        [
            click.Option(
                ["--rate-limit"],
                default=None,
                help="The project's gateway rate limit, all its keys together "
                "(e.g. 100/second;5000/hour).",
            ),
            click.Option(
                ["--default-rate-limit"],
                is_flag=True,
                default=False,
                help="Use APEX_RATE_LIMIT again.",
            ),
        ],
        _apply_rate_limit,
    ),
    ProjectSetting(
        "ip mode",
        [
            click.Option(
                ["--ip-mode"],
                type=click.Choice(["full", "truncated", "none"]),
                default=None,
                help="What is kept of client IPs from now on (rows already stored keep theirs).",
            )
        ],
        _apply_ip_mode,
    ),
    ProjectSetting(
        "bots",
        [
            click.Option(
                ["--drop-bots/--keep-bots", "drop_bots"],
                default=None,
                help="Drop events flagged as bots (answered as accepted), or store them with "
                "is_bot.",
            )
        ],
        _apply_drop_bots,
    ),
    ProjectSetting(
        "cookieless",
        [
            click.Option(
                ["--cookieless/--no-cookieless", "cookieless"],
                default=None,
                help="Accept snippet events without visitorId (the server derives a visitor id "
                "that changes every day: docs/snippet.md), or require visitorId again.",
            )
        ],
        _apply_cookieless,
    ),
)


def apply_settings(project: Project, values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Apply every setting whose options were given; (setting, new value) of each change."""
    changes = []
    for setting in SETTINGS:
        shown = setting.apply(project, values)
        if shown is not None:
            changes.append((setting.name, shown))
    return changes
