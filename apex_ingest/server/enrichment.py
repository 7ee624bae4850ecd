"""What the server derives from an event on the way in (issue #19; rules: docs/enrichment.md).

Per request (every event of a request shares its IP and User-Agent), computed once:
- the parsed User-Agent: browser family and major version, OS family, device class, bot flag
  (`ua-parser` with its precompiled rules and native resolver, `crawlerdetect`), cached per
  distinct User-Agent in an LRU, so a repeated one costs a dictionary lookup;
- the country of the client IP (`geoip2fast`'s bundled database, held as arrays by
  apex_ingest/server/countries.py, or an operator's MaxMind file), looked up from the full
  IP BEFORE the IP is reduced as the project's `ip_mode` says (`scrub_ip`), so a project
  that keeps no IP still gets its countries.

Per event: the campaign parameters of the (already redacted) URL and the referrer's host and
class. URLs without a campaign marker skip the parsing; referrer classes are cached per host.

`configure()` (called by create_server with the server's settings) chooses whether any of this
runs (APEX_ENRICHMENT) and which country database is used (APEX_GEOIP). Clock-skew correction
and `ip_mode` are not enrichment: they always apply (apex_ingest/server/validation.py).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from apex_ingest.common.ip import truncated_ip
from apex_ingest.server.countries import CountryTable

log = logging.getLogger(__name__)

IP_MODES = ("full", "truncated", "none")
#: A campaign value (utm_*, gclid, fbclid) is stored cut to this many characters.
MAX_CAMPAIGN_CHARS = 256
#: Distinct User-Agents (and referrer hosts, IPs) whose results are kept.
UA_CACHE_SIZE = 4096

#: The columns enrichment fills, in the order of `events` (migration 0008), beside
#: `client_occurred_at` and `clock_skew_ms`, which validation fills.
REQUEST_COLUMNS = ("browser", "browser_version", "os", "device_class", "is_bot", "country")
CAMPAIGN_COLUMNS = (
    "utm_source",
    "utm_medium",
    "utm_campaign",
    "utm_term",
    "utm_content",
    "gclid",
    "fbclid",
)
REFERRER_COLUMNS = ("referrer_host", "referrer_class")
ENRICHED_COLUMNS = (
    "client_occurred_at",
    "clock_skew_ms",
    *REQUEST_COLUMNS[:-1],
    *CAMPAIGN_COLUMNS,
    *REFERRER_COLUMNS,
    REQUEST_COLUMNS[-1],
)


# --- IP privacy ---------------------------------------------------------------------------


@lru_cache(maxsize=UA_CACHE_SIZE)
def scrub_ip(ip: str | None, mode: str) -> str | None:
    """What a project with `ip_mode` keeps of `ip` (normalized text): `full` all of it,
    `truncated` the network (IPv4 /24, IPv6 /48: `203.0.113.0`, `2001:db8:1::`), `none`
    nothing. Anything else keeps nothing (a mode this server does not know must not leak)."""
    if ip is None or mode == "full":
        return ip if mode == "full" else None
    return truncated_ip(ip) if mode == "truncated" else None


# --- the User-Agent ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Agent:
    browser: str | None = None
    browser_version: str | None = None
    os: str | None = None
    #: desktop, mobile, tablet, bot; None for what is not a browser (curl, SDKs, libraries).
    device_class: str | None = None
    is_bot: bool | None = None


NO_AGENT = Agent()

#: HTTP libraries and command-line clients: a backend sending its own events (our SDK, a
#: customer's server), never a crawler, though crawler lists name them (they also scrape).
_SERVER_CLIENT = re.compile(
    r"^(?:curl|wget|python-requests|python-urllib|python-httpx|python/|aiohttp|httpx|okhttp|"
    r"go-http-client|java/|apache-httpclient|node-fetch|node|axios|undici|got|ruby|faraday|"
    r"guzzlehttp|dart|dotnet|restsharp|postmanruntime|insomnia|grpc-|apex-ingest-sdk)",
    re.IGNORECASE,
)
#: Headless browsers: automation, not people, whatever else they claim.
_HEADLESS = re.compile(r"HeadlessChrome|PhantomJS|Headless|SlimerJS|Electron/\S+ .*Puppeteer")
_MOBILE_OS = frozenset({"iOS", "Android", "Windows Phone", "BlackBerry OS", "KaiOS", "Tizen"})
_TABLET_DEVICE = re.compile(r"iPad|Tablet|Kindle|Nexus (?:7|9|10)|SM-T\d|Tab\b", re.IGNORECASE)


class _Crawlers(Protocol):
    def isCrawler(self, user_agent: str) -> bool: ...


_crawlers: _Crawlers | None = None
_crawlers_lock = threading.Lock()


def _crawler_list() -> _Crawlers | None:
    """crawlerdetect's list (built once: its regex costs ~10 ms to compile)."""
    global _crawlers
    if _crawlers is None:
        with _crawlers_lock:
            if _crawlers is None:
                try:
                    from crawlerdetect import CrawlerDetect

                    _crawlers = CrawlerDetect()
                except ImportError:  # pragma: no cover - a declared dependency
                    log.warning("crawlerdetect is not installed: bots only by ua-parser")
                    return None
    return _crawlers


@lru_cache(maxsize=UA_CACHE_SIZE)
def parse_agent(user_agent: str | None) -> Agent:
    """The browser, OS, device class and bot flag of a User-Agent (cached per distinct one)."""
    if not user_agent:
        return NO_AGENT
    import ua_parser  # its parser picks the native resolver (ua-parser-rs) when installed

    parsed = ua_parser.parse(user_agent)
    agent, system, device = parsed.user_agent, parsed.os, parsed.device
    browser = agent.family if agent is not None and agent.family != "Other" else None
    version = agent.major if agent is not None and browser is not None else None
    os_family = system.family if system is not None and system.family != "Other" else None
    device_family = device.family if device is not None else ""
    server_client = _SERVER_CLIENT.match(user_agent) is not None
    is_bot = not server_client and (
        device_family == "Spider"
        or _HEADLESS.search(user_agent) is not None
        or _is_listed_crawler(user_agent)
    )
    if is_bot:
        device_class: str | None = "bot"
    elif not user_agent.startswith(("Mozilla/", "Opera/")):
        device_class = None  # not a browser: a library, a tool, an SDK
    elif _TABLET_DEVICE.search(device_family) or (
        os_family == "Android" and "Mobile" not in user_agent
    ):
        device_class = "tablet"
    elif os_family in _MOBILE_OS or device_family == "iPhone" or "Mobile" in user_agent:
        device_class = "mobile"
    else:
        device_class = "desktop"
    return Agent(
        browser=browser[:64] if browser else None,
        browser_version=version[:32] if version else None,
        os=os_family[:64] if os_family else None,
        device_class=device_class,
        is_bot=is_bot,
    )


def _is_listed_crawler(user_agent: str) -> bool:
    crawlers = _crawler_list()
    return crawlers is not None and bool(crawlers.isCrawler(user_agent))


# --- campaigns and referrers ---------------------------------------------------------------

_NO_CAMPAIGN: tuple[str | None, ...] = (None,) * len(CAMPAIGN_COLUMNS)
_CAMPAIGN_INDEX = {name: index for index, name in enumerate(CAMPAIGN_COLUMNS)}


def campaign(url: str) -> tuple[str | None, ...]:
    """utm_source, utm_medium, utm_campaign, utm_term, utm_content, gclid, fbclid of `url`'s
    query (the first of each, decoded, cut to MAX_CAMPAIGN_CHARS; None when absent or empty)."""
    if "utm_" not in url and "clid=" not in url:
        return _NO_CAMPAIGN  # most URLs: one substring search, no parsing
    return _campaign(url)


@lru_cache(maxsize=UA_CACHE_SIZE)
def _campaign(url: str) -> tuple[str | None, ...]:
    query = url.partition("?")[2].partition("#")[0]
    values: list[str | None] = list(_NO_CAMPAIGN)
    for name, value in parse_qsl(query, keep_blank_values=False):
        index = _CAMPAIGN_INDEX.get(name.lower())
        if index is not None and values[index] is None:
            values[index] = value[:MAX_CAMPAIGN_CHARS]
    return tuple(values)


#: Brand labels of search engines: google.com, google.co.uk, search.brave.com, duckduckgo.com...
SEARCH_LABELS = frozenset(
    {
        "google", "bing", "duckduckgo", "yahoo", "yandex", "baidu", "ecosia", "qwant",
        "startpage", "naver", "seznam", "ask", "sogou", "kagi", "brave", "aol", "dogpile",
        "daum", "mojeek",
    }
)  # fmt: skip
#: Web mail: their hosts, and any host starting with `mail.` or `webmail.`.
EMAIL_HOSTS = frozenset(
    {
        "outlook.live.com", "outlook.office.com", "outlook.office365.com", "app.fastmail.com",
        "app.hey.com", "mail.proton.me", "com.google.android.gm",
    }
)  # fmt: skip
#: Social networks and link shorteners of social networks (a host or its subdomains).
SOCIAL_DOMAINS = frozenset(
    {
        "facebook.com", "fb.com", "instagram.com", "t.co", "twitter.com", "x.com",
        "linkedin.com", "lnkd.in", "reddit.com", "youtube.com", "youtu.be", "tiktok.com",
        "pinterest.com", "tumblr.com", "news.ycombinator.com", "mastodon.social", "bsky.app",
        "threads.net", "vk.com", "weibo.com", "snapchat.com", "quora.com", "discord.com",
        "whatsapp.com", "t.me", "telegram.org", "messenger.com", "xing.com", "medium.com",
    }
)  # fmt: skip


def referrer(referrer: str | None, url: str) -> tuple[str | None, str]:
    """(referrer_host, referrer_class) of an event: `direct` without a referrer, `internal`
    when the referrer is the event's own site, else `email`, `social`, `search` or `other`."""
    if not referrer:
        return _DIRECT
    return _referrer(referrer, _host(url) if url[:1] != "/" else None)


_DIRECT: tuple[str | None, str] = (None, "direct")


@lru_cache(maxsize=UA_CACHE_SIZE)
def _referrer(referrer: str, site: str | None) -> tuple[str | None, str]:
    host = _host(referrer)
    if host is None:
        return None, "other"
    if site is not None and _same_site(host, site):
        return host, "internal"
    return host, _host_class(host)


@lru_cache(maxsize=UA_CACHE_SIZE)
def _host(url: str) -> str | None:
    """The host of an absolute URL, lower case, without port; android-app://PACKAGE gives the
    package (apps referring to the web)."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host[:255] if host else None


def _same_site(host: str, site: str) -> bool:
    """One is the other or a subdomain of it (www.example.com, blog.example.com, example.com)."""
    if host == site:
        return True
    host, site = host.removeprefix("www."), site.removeprefix("www.")
    return host == site or host.endswith("." + site) or site.endswith("." + host)


@lru_cache(maxsize=UA_CACHE_SIZE)
def _host_class(host: str) -> str:
    if host in EMAIL_HOSTS or host.startswith(("mail.", "webmail.")):
        return "email"
    parts = host.split(".")
    for index in range(len(parts)):
        if ".".join(parts[index:]) in SOCIAL_DOMAINS:
            return "social"
    # The brand label before the public suffix (google in www.google.co.uk): any label but
    # the last, so `search.example` is not read as a search engine.
    if any(label in SEARCH_LABELS for label in parts[:-1]):
        return "search"
    return "other"


# --- country ---------------------------------------------------------------------------------


class _Countries(Protocol):
    def country(self, ip: str) -> str | None: ...


class _MaxMind:
    """A MaxMind DB file the operator provides (GeoLite2-Country.mmdb or compatible)."""

    def __init__(self, path: str) -> None:
        import maxminddb

        self._db: Any = maxminddb.open_database(path)

    def country(self, ip: str) -> str | None:
        record = self._db.get(ip)
        if not isinstance(record, dict):
            return None
        country = record.get("country") or record.get("registered_country") or {}
        code = country.get("iso_code") if isinstance(country, dict) else None
        return code if isinstance(code, str) and len(code) == 2 else None


class _NoCountries:
    def country(self, ip: str) -> str | None:
        return None


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Config:
    #: APEX_ENRICHMENT: off stores none of the derived columns (the bench's baseline).
    enabled: bool = True
    #: APEX_GEOIP: "builtin" (geoip2fast), "off", or the path of a MaxMind DB file.
    geoip: str = "builtin"


_config = Config()
_countries: _Countries | None = None
_countries_lock = threading.Lock()


def configure(enabled: bool = True, geoip: str = "builtin") -> None:
    """Choose what runs (the server calls this with its settings); a new country source is
    opened when first needed."""
    global _config, _countries
    with _countries_lock:
        if _config.geoip != geoip:
            _countries = None  # opened anew, from the other source, when first needed
            country.cache_clear()
        _config = Config(enabled, geoip)


def enabled() -> bool:
    return _config.enabled


def _country_reader() -> _Countries:
    global _countries
    if _countries is None:
        with _countries_lock:
            if _countries is None:
                _countries = _open_countries(_config.geoip)
    return _countries


def _open_countries(geoip: str) -> _Countries:
    if geoip == "off":
        return _NoCountries()
    try:
        return CountryTable.load() if geoip == "builtin" else _MaxMind(geoip)
    except Exception:  # a missing or broken database must not stop ingestion
        log.exception("no country database (APEX_GEOIP=%s): countries are not stored", geoip)
        return _NoCountries()


@lru_cache(maxsize=UA_CACHE_SIZE)
def country(ip: str | None) -> str | None:
    """The ISO 3166-1 alpha-2 code of a (full) IP's country; None for private, loopback and
    unknown addresses."""
    if not ip:
        return None
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if not address.is_global:
        return None
    return _country_reader().country(ip)


def warm_up() -> None:
    """Load the parsers and the country database now (at server start, in the background)
    rather than on the first request, which would otherwise wait ~1 s."""
    if not _config.enabled:
        return
    parse_agent(
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/131.0.0.0 Safari/537.36"
    )
    _country_reader()


def request_columns(
    ip: str | None, user_agent: str | None, ip_mode: str, enrich: bool = True
) -> dict[str, Any]:
    """The columns every event of a request shares: the IP as `ip_mode` keeps it, the parsed
    User-Agent and the country (looked up from the full IP before it is reduced). `enrich`
    False: none derived (rows built only to report violations, before authentication)."""
    if not (enrich and _config.enabled):
        return {
            "ip": scrub_ip(ip, ip_mode),
            "browser": None,
            "browser_version": None,
            "os": None,
            "device_class": None,
            "is_bot": None,
            "country": None,
        }
    agent = parse_agent(user_agent)
    return {
        "ip": scrub_ip(ip, ip_mode),
        "browser": agent.browser,
        "browser_version": agent.browser_version,
        "os": agent.os,
        "device_class": agent.device_class,
        "is_bot": agent.is_bot,
        "country": country(ip),
    }


_NO_EVENT_COLUMNS: dict[str, Any] = dict.fromkeys(CAMPAIGN_COLUMNS + REFERRER_COLUMNS)
_NO_CAMPAIGN_COLUMNS: dict[str, Any] = dict.fromkeys(CAMPAIGN_COLUMNS)


def event_columns(url: str, referrer_url: str | None, enrich: bool = True) -> dict[str, Any]:
    """The columns of one event: campaign parameters of its URL, its referrer's host and class.

    The dict returned is shared between calls (cached per (url, referrer): a site's pages and
    their referrers repeat, so most events cost one lookup): callers copy it, never change it.
    """
    if not (enrich and _config.enabled):
        return _NO_EVENT_COLUMNS
    return _event_columns(url, referrer_url)


@lru_cache(maxsize=UA_CACHE_SIZE)
def _event_columns(url: str, referrer_url: str | None) -> dict[str, Any]:
    campaign_columns = (
        _campaign_columns(url) if "utm_" in url or "clid=" in url else _NO_CAMPAIGN_COLUMNS
    )
    host, kind = referrer(referrer_url, url)
    return {**campaign_columns, "referrer_host": host, "referrer_class": kind}


@lru_cache(maxsize=UA_CACHE_SIZE)
def _campaign_columns(url: str) -> dict[str, Any]:
    return dict(zip(CAMPAIGN_COLUMNS, _campaign(url), strict=True))
