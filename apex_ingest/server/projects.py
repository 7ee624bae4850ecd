"""Projects: creating, listing and revoking keys, and the cached key lookup used per request."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import idna
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.server.models import Project
from apex_ingest.server.redaction import normalize_names
from apex_ingest.server.validation import project_key_problem

KEY_PREFIX = "pk_live_"


class InvalidKey(ValueError):
    """A chosen key that requests could never authenticate with."""


def generate_key() -> str:
    # 18 random bytes -> 24 URL-safe characters.
    return KEY_PREFIX + secrets.token_urlsafe(18)


def normalize_origin(origin: str) -> str:
    """`https://Shop.Example:443/` -> `https://shop.example`, as browsers send Origin.

    A non-ASCII host name becomes its punycode form (`bücher.example` ->
    `xn--bcher-kva.example`), which is what browsers send.
    """
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) origin: {origin!r}")
    default_port = 443 if parts.scheme == "https" else 80
    host = parts.hostname
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as error:
            raise ValueError(f"not a valid host name in {origin!r}: {error}") from error
    host = host if ":" not in host else f"[{host}]"
    port = f":{parts.port}" if parts.port and parts.port != default_port else ""
    return f"{parts.scheme}://{host}{port}"


class InvalidParamName(ValueError):
    """A `--redact-param` name that no query parameter could match."""


#: A redacted parameter name: 1-100 characters, no control characters, none of `=&#?`.
MAX_PARAM_NAME_CHARS = 100


def check_param_names(names: Iterable[str]) -> list[str]:
    """The names, stripped, lower case, sorted and without repeats; InvalidParamName if bad."""
    checked = set()
    for raw in names:
        name = raw.strip()
        if not 1 <= len(name) <= MAX_PARAM_NAME_CHARS:
            raise InvalidParamName(
                f"a parameter name must be 1-{MAX_PARAM_NAME_CHARS} characters, got {raw!r}"
            )
        if any(ch in "=&#?" or ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in name):
            raise InvalidParamName(
                f"a parameter name has no control characters nor any of = & # ?, got {raw!r}"
            )
        checked.add(name.lower())
    return sorted(checked)


def create_project(
    session: Session,
    name: str,
    key: str | None = None,
    allowed_origins: Iterable[str] = (),
    redact_params: Iterable[str] = (),
) -> Project:
    if key is not None:
        problem = project_key_problem(key)
        if problem:
            raise InvalidKey(f"the key {problem}")
    extra = check_param_names(redact_params)
    project = Project(
        key=key or generate_key(),
        name=name,
        allowed_origins=sorted({normalize_origin(o) for o in allowed_origins}),
        redact_params=extra or None,
        created_at=datetime.now(UTC),
        revoked_at=None,
    )
    session.add(project)
    session.flush()
    return project


def list_projects(session: Session) -> Sequence[Project]:
    return session.scalars(select(Project).order_by(Project.id)).all()


def find_project(session: Session, key: str) -> Project | None:
    return session.scalars(select(Project).where(Project.key == key)).one_or_none()


def revoke_project(session: Session, key: str) -> bool:
    """Revoke a key; False if there is no such active key."""
    project = find_project(session, key)
    if project is None or project.revoked_at is not None:
        return False
    project.revoked_at = datetime.now(UTC)
    return True


@dataclass(frozen=True)
class ProjectInfo:
    id: int
    allowed_origins: frozenset[str]
    #: The project's own query parameter names to redact (lower case), beside the built-in list.
    redact_params: frozenset[str] = frozenset()

    def allows_origin(self, origin: str) -> bool:
        if not self.allowed_origins or not origin:
            return True
        try:
            return normalize_origin(origin) in self.allowed_origins
        except ValueError:
            return False  # "null" and other opaque origins never match an allowlist


class ProjectDirectory:
    """Looks up active projects by key, caching answers (misses too) for `ttl` seconds.

    So a revocation, a new project or a changed allowlist takes effect within `ttl`
    seconds on every server.
    """

    MAX_ENTRIES = 100_000

    def __init__(self, session_factory: sessionmaker[Session], ttl: float) -> None:
        self._session_factory = session_factory
        self._ttl = ttl
        self._cache: dict[str, tuple[float, ProjectInfo | None]] = {}
        self._lock = threading.Lock()

    def lookup(self, key: str) -> ProjectInfo | None:
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        with self._session_factory() as session:
            project = find_project(session, key)
            info = (
                ProjectInfo(
                    project.id,
                    _normalized_origins(project.allowed_origins),
                    normalize_names(project.redact_params or ()),
                )
                if project is not None and project.revoked_at is None
                else None
            )
        with self._lock:
            if len(self._cache) >= self.MAX_ENTRIES:
                self._cache.clear()  # bounded memory against floods of random keys
            self._cache[key] = (now + self._ttl, info)
        return info


def _normalized_origins(stored: Iterable[str]) -> frozenset[str]:
    """The allowlist in the form browsers send (rows written before IDN hosts were encoded)."""
    origins = set()
    for origin in stored:
        try:
            origins.add(normalize_origin(origin))
        except ValueError:
            origins.add(origin)
    return frozenset(origins)
