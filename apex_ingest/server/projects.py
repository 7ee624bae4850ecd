"""Projects: creating, listing and revoking keys, and the cached key lookup used per request."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import idna
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from apex_ingest.server.cookieless import VisitorSalts
from apex_ingest.server.enrichment import IP_MODES
from apex_ingest.server.models import Project, ProjectKey
from apex_ingest.server.redaction import normalize_names
from apex_ingest.server.storage import UNAVAILABLE_ERRORS
from apex_ingest.server.validation import project_key_problem

KEY_PREFIX = "pk_live_"
SECRET_KEY_PREFIX = "sk_live_"
PUBLIC, SECRET = "public", "secret"


class InvalidKey(ValueError):
    """A chosen key that requests could never authenticate with."""


def generate_key() -> str:
    # 18 random bytes -> 24 URL-safe characters.
    return KEY_PREFIX + secrets.token_urlsafe(18)


def generate_secret_key() -> str:
    # 24 random bytes -> 32 URL-safe characters.
    return SECRET_KEY_PREFIX + secrets.token_urlsafe(24)


def secret_digest(secret: str) -> str:
    """What `project_keys` stores of a secret key: its SHA-256, in hex."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def normalize_origin(origin: str) -> str:
    """`https://Shop.Example:443/` -> `https://shop.example`, as browsers send Origin.

    A non-ASCII host name becomes its punycode form (`bücher.example` ->
    `xn--bcher-kva.example`), which is what browsers send. ValueError for what no browser
    sends as an Origin (a path, a query, a user, a `*` wildcard): an allowlist entry that could
    never match would refuse the site it was meant for without a word.
    """
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) origin: {origin!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"an origin is scheme://host[:port], nothing more: {origin!r}")
    if "*" in parts.hostname:
        raise ValueError(f"wildcards are not supported, list each origin: {origin!r}")
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
    ip_mode: str = "full",
    drop_bots: bool = False,
    cookieless: bool = False,
) -> Project:
    check_ip_mode(ip_mode)
    if key is not None:
        problem = project_key_problem(key)
        if problem:
            raise InvalidKey(f"the key {problem}")
    extra = check_param_names(redact_params)
    public_key = key or generate_key()
    if session.scalars(
        select(ProjectKey.id).where(ProjectKey.kind == PUBLIC, ProjectKey.key == public_key)
    ).first():
        raise KeyExists(public_key)
    now = datetime.now(UTC)
    project = Project(
        key=public_key,  # kept for readers of `projects`; the server reads project_keys
        name=name,
        allowed_origins=sorted({normalize_origin(o) for o in allowed_origins}),
        redact_params=extra or None,
        cookieless=cookieless,
        created_at=now,
        revoked_at=None,
        ip_mode=ip_mode,
        drop_bots=drop_bots,
    )
    session.add(project)
    session.flush()
    add_key(session, project.id, PUBLIC, key=public_key)
    return project


#: A project name's length at most.
MAX_NAME_CHARS = 200


class InvalidName(ValueError):
    """A blank name, or one over MAX_NAME_CHARS."""


class NameTaken(ValueError):
    """Another project has this name: `--project NAME` could no longer tell them apart."""


#: The advisory lock (PostgreSQL) that serializes naming projects until each transaction ends.
_NAMING_LOCK = 0x61706578_6E616D65  # "apexname"


def check_name(session: Session, name: str, project_id: int | None = None) -> str:
    """`name` if project `project_id` (None: a new one) may take it; InvalidName, NameTaken.

    The admin commands (`projects create`, `update --name`) keep names unique, exactly as
    `--project NAME` matches them, revoked projects' included: they find a project by its name.
    Not a constraint, which databases holding duplicates from before could not take (and
    which tests creating many projects of one name would trip). Two admins naming projects at
    the same instant: the second check waits for the first one's transaction (PostgreSQL: a
    transaction-level advisory lock; SQLite: its write lock, taken before the check), then
    sees its name.
    """
    if not name.strip() or len(name) > MAX_NAME_CHARS:
        raise InvalidName(f"a name is 1-{MAX_NAME_CHARS} characters, not only spaces")
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _NAMING_LOCK})
    elif dialect == "sqlite":
        # A write that changes nothing takes SQLite's write lock now, before the check reads
        # (another writer's transaction is waited for), not at the INSERT after it.
        session.execute(text("UPDATE projects SET name = name WHERE 0"))
    others = select(Project.id).where(Project.name == name)
    if project_id is not None:
        others = others.where(Project.id != project_id)
    if session.scalars(others.limit(1)).first() is not None:
        raise NameTaken(f"another project is named {name!r}")
    return name


def check_ip_mode(ip_mode: str) -> str:
    """`ip_mode` if it is one the server knows; ValueError otherwise."""
    if ip_mode not in IP_MODES:
        raise ValueError(f"ip_mode must be one of {', '.join(IP_MODES)}, not {ip_mode!r}")
    return ip_mode


def update_privacy(
    session: Session, project_id: int, ip_mode: str | None = None, drop_bots: bool | None = None
) -> Project:
    """Change a project's IP mode and bot dropping (issue #19); None leaves a setting as it is.

    Kept apart from any fuller `projects update`: these two settings only. Servers apply the
    change within APEX_PROJECT_CACHE_TTL; rows already stored keep what they were stored with.
    """
    project = session.get(Project, project_id)
    if project is None:
        raise LookupError(f"no project {project_id}")
    if ip_mode is not None:
        project.ip_mode = check_ip_mode(ip_mode)
    if drop_bots is not None:
        project.drop_bots = drop_bots
    session.flush()
    return project


class KeyExists(ValueError):
    """A chosen public key that another project already has."""


def add_key(
    session: Session, project_id: int, kind: str, label: str = "default", key: str | None = None
) -> str:
    """Give a project a new key of `kind` ("public" or "secret"); return the key.

    A secret key is returned here once: only its SHA-256 is stored.
    """
    if kind == PUBLIC:
        plain = key or generate_key()
        stored = plain
    elif kind == SECRET:
        plain = key or generate_secret_key()
        stored = secret_digest(plain)
    else:
        raise ValueError(f"a key is public or secret, not {kind!r}")
    session.add(
        ProjectKey(
            project_id=project_id,
            kind=kind,
            key=stored,
            label=label,
            created_at=datetime.now(UTC),
            revoked_at=None,
        )
    )
    session.flush()
    return plain


def list_keys(session: Session, project_id: int) -> Sequence[ProjectKey]:
    """Every key of a project, revoked ones too, oldest first."""
    return session.scalars(
        select(ProjectKey).where(ProjectKey.project_id == project_id).order_by(ProjectKey.id)
    ).all()


def shown_key(row: ProjectKey) -> str:
    """How a key is shown in listings: a public key as it is; a secret key (only its SHA-256
    is stored) as the start of that digest, enough to tell two apart."""
    return row.key if row.kind == PUBLIC else f"sk_live_... (sha256 {row.key[:12]})"


def find_key(session: Session, project_id: int | None, key: str) -> ProjectKey | None:
    """The key row for `key`, a public key or a secret key given in plain: the project's, or
    any project's when `project_id` is None (keys are unique per kind)."""
    of_project = [] if project_id is None else [ProjectKey.project_id == project_id]
    return session.scalars(
        select(ProjectKey).where(
            *of_project,
            ((ProjectKey.kind == PUBLIC) & (ProjectKey.key == key))
            | ((ProjectKey.kind == SECRET) & (ProjectKey.key == secret_digest(key))),
        )
    ).first()


class LastKey(ValueError):
    """Revoking this key would leave the project without an active key of its kind."""


def revoke_key_row(session: Session, row: ProjectKey, allow_last: bool = False) -> bool:
    """Revoke one key row; False if it was revoked already.

    Unless `allow_last`, refuses (LastKey) to revoke a project's last active key of a kind:
    rotation adds the new key first, and a project left without a public key stops receiving
    events (with `allow_last` that is what the owner asks for).
    """
    if row.revoked_at is not None:
        return False
    if not allow_last:
        others = session.scalars(
            select(ProjectKey.id).where(
                ProjectKey.project_id == row.project_id,
                ProjectKey.kind == row.kind,
                ProjectKey.revoked_at.is_(None),
                ProjectKey.id != row.id,
            )
        ).first()
        if others is None:
            raise LastKey(f"this is the project's last active {row.kind} key")
    row.revoked_at = datetime.now(UTC)
    return True


class InvalidRateLimit(ValueError):
    """A per-project rate limit the gateway could not parse."""


#: The stored text of a rate limit is at most this long (projects.rate_limit).
MAX_RATE_LIMIT_CHARS = 200


def check_rate_limit(text: str) -> str:
    """`text` stripped if it is a rate limit like `100/second;5000/hour` (APEX_RATE_LIMIT's
    syntax, parsed as the gateway parses it); InvalidRateLimit otherwise."""
    from limits import parse_many  # the gateway's parser: what it accepts, and nothing else

    cleaned = text.strip()
    try:
        parsed = parse_many(cleaned) if cleaned.isascii() else []
    except ValueError:
        parsed = []
    if not parsed or len(cleaned) > MAX_RATE_LIMIT_CHARS:
        raise InvalidRateLimit(
            f"a rate limit is like 100/second or 100/second;5000/hour, not {text!r}"
        )
    return cleaned


def set_cookieless(session: Session, project_id: int, cookieless: bool) -> None:
    """Turn cookieless visitors on or off for a project (`projects update --cookieless`).

    Takes effect within APEX_PROJECT_CACHE_TTL seconds, like every project setting.
    """
    project = session.get(Project, project_id)
    if project is None:
        raise ValueError(f"no project {project_id}")
    project.cookieless = cookieless


def list_projects(session: Session) -> Sequence[Project]:
    return session.scalars(select(Project).order_by(Project.id)).all()


def active_public_keys(session: Session, project_id: int) -> list[str]:
    return list(
        session.scalars(
            select(ProjectKey.key)
            .where(
                ProjectKey.project_id == project_id,
                ProjectKey.kind == PUBLIC,
                ProjectKey.revoked_at.is_(None),
            )
            .order_by(ProjectKey.id)
        )
    )


def find_project(session: Session, key: str) -> Project | None:
    """The project a public key (active or revoked) belongs to."""
    return session.scalars(
        select(Project)
        .join(ProjectKey, ProjectKey.project_id == Project.id)
        .where(ProjectKey.kind == PUBLIC, ProjectKey.key == key)
    ).one_or_none()


def revoke_project(session: Session, key: str) -> bool:
    """Revoke a public key; False if there is no such active key.

    Only that key: the project's other keys (its secret keys, other public keys) stay valid.
    """
    return revoke_key(session, PUBLIC, key)


def revoke_key(session: Session, kind: str, key: str) -> bool:
    """Revoke a key of `kind` (a secret key given in plain); False if no such active key."""
    stored = secret_digest(key) if kind == SECRET else key
    row = session.scalars(
        select(ProjectKey).where(ProjectKey.kind == kind, ProjectKey.key == stored)
    ).one_or_none()
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = datetime.now(UTC)
    return True


@dataclass(frozen=True)
class ProjectInfo:
    id: int
    allowed_origins: frozenset[str]
    #: The project's own query parameter names to redact (lower case), beside the built-in list.
    redact_params: frozenset[str] = frozenset()
    name: str = ""
    #: The project's own gateway rate limit (e.g. "100/second"); None: APEX_RATE_LIMIT.
    rate_limit: str | None = None
    #: `projects.key`, the project's first public key: never changes, unique beyond one database
    #: (names the project's rate-limit window at the gateway).
    uid: str = ""
    #: What is kept of client IPs: "full", "truncated" or "none" (enrichment.scrub_ip).
    ip_mode: str = "full"
    #: Drop events flagged as bots (answered as accepted, counted in metrics).
    drop_bots: bool = False
    #: Snippet events without visitorId get a derived one (apex_ingest/server/cookieless.py).
    cookieless: bool = False

    def allows_origin(self, origin: str) -> bool:
        if not self.allowed_origins or not origin:
            return True
        try:
            return normalize_origin(origin) in self.allowed_origins
        except ValueError:
            return False  # "null" and other opaque origins never match an allowlist


class ProjectDirectory:
    """Looks up the projects of active keys, caching answers (misses too) for `ttl` seconds.

    So a revocation, a new key or project or a changed allowlist takes effect within `ttl`
    seconds on every server. Public keys (`lookup`) and secret keys (`lookup_secret`) are
    cached apart: a public key never authenticates as a secret one, nor the reverse.
    """

    MAX_ENTRIES = 100_000

    def __init__(
        self, session_factory: sessionmaker[Session], ttl: float, stale_for: float = 0.0
    ) -> None:
        """`stale_for` (stream mode, APEX_STREAM_KEY_GRACE): while the database is unreachable,
        an answer fetched at most `ttl + stale_for` seconds ago is given instead of the error,
        so ingestion goes on through a database outage with the keys as they last were."""
        self._session_factory = session_factory
        self._ttl = ttl
        self._stale_for = stale_for
        #: cache key -> (time.monotonic() past which it is looked up again, answer, fetched at)
        self._cache: dict[str, tuple[float, ProjectInfo | None, float]] = {}
        self._lock = threading.Lock()
        #: The daily salts of cookieless visitor ids: per-request project state that needs the
        #: database and a per-process cache, like the keys (apex_ingest/server/cookieless.py).
        self.visitor_salts = VisitorSalts(session_factory)

    def lookup(self, key: str) -> ProjectInfo | None:
        """The project of an active public key, or None."""
        return self._lookup(PUBLIC, key)

    def lookup_secret(self, secret: str) -> ProjectInfo | None:
        """The project of an active secret key, or None."""
        return self._lookup(SECRET, secret_digest(secret))

    def _lookup(self, kind: str, stored: str) -> ProjectInfo | None:
        now = time.monotonic()
        cache_key = f"{kind}:{stored}"
        cached = self._cache.get(cache_key)
        if cached is not None and cached[0] > now:
            return cached[1]
        stale_until = None if cached is None else cached[2] + self._ttl + self._stale_for
        if stale_until is not None and self._stale_for > 0 and now <= stale_until:
            # Stream mode: this request reads the key again; concurrent ones keep the last
            # known answer meanwhile (a database that hangs then delays one request per key a
            # second, not all of them).
            assert cached is not None
            with self._lock:
                self._cache[cache_key] = (min(now + 1.0, stale_until), cached[1], cached[2])
        try:
            info = self._fetch(kind, stored)
        except UNAVAILABLE_ERRORS:
            if cached is not None and stale_until is not None and now <= stale_until:
                # Stream mode: the last known answer, through the outage. Asked again after a
                # second at the earliest: not one failing connection attempt per request.
                until = min(now + max(self._ttl, 1.0), stale_until)
                with self._lock:
                    self._cache[cache_key] = (until, cached[1], cached[2])
                return cached[1]
            raise
        with self._lock:
            if len(self._cache) >= self.MAX_ENTRIES:
                self._cache.clear()  # bounded memory against floods of random keys
            self._cache[cache_key] = (now + self._ttl, info, now)
        return info

    def _fetch(self, kind: str, stored: str) -> ProjectInfo | None:
        with self._session_factory() as session:
            project = session.scalars(
                select(Project)
                .join(ProjectKey, ProjectKey.project_id == Project.id)
                .where(
                    ProjectKey.kind == kind,
                    ProjectKey.key == stored,
                    ProjectKey.revoked_at.is_(None),
                )
            ).one_or_none()
            info = (
                ProjectInfo(
                    project.id,
                    _normalized_origins(project.allowed_origins),
                    normalize_names(project.redact_params or ()),
                    project.name,
                    project.rate_limit or None,
                    project.key,
                    project.ip_mode or "full",
                    bool(project.drop_bots),
                    bool(project.cookieless),
                )
                if project is not None
                else None
            )
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
