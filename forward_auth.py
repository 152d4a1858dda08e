"""forward-auth: TOTP-only forward authentication for a reverse proxy.

The proxy (Caddy ``forward_auth``, nginx ``auth_request``, Traefik
``forwardAuth``) asks this service, on every request, whether the browser is
logged in: ``/verify`` (Caddy, Traefik) and ``/auth`` (nginx) answer ``200``
with ``Remote-User`` (and ``Remote-Name``, ``-Email``, ``-Groups``) from a
signed session cookie or an app token, ``403``
when that user may not open the host, or send the browser to ``/login``,
where a person types the 6-digit code from an authenticator app.

Usage::

    python forward_auth.py                      # serve (creates a first user in a new database)
    python forward_auth.py -invite alice        # a single-use enrolment link for alice
    python forward_auth.py -generate alice      # add a user, print secret + QR code here
    python forward_auth.py -allow alice 'wiki.example.com' '*.media.example.com'
    python forward_auth.py -user alice --name 'Alice Doe' --email alice@example.com --groups family
    python forward_auth.py -token alice backup  # an app token for a script
    python forward_auth.py -tokens              # app tokens (never the token itself)
    python forward_auth.py -revoke-token alice backup
    python forward_auth.py -list                # users, their hosts, last login
    python forward_auth.py -sessions            # live sessions (with their short ids)
    python forward_auth.py -logout alice        # end alice's sessions (--session ID: one of them)
    python forward_auth.py -history alice       # who signed in, and what admins did
    python forward_auth.py -revoke alice        # delete a user, end their sessions
    python forward_auth.py -backup FILE         # consistent online copy of the database
    python forward_auth.py -version

The household manages itself from a browser on the admin page, ``/login/admin``
(users in ``ADMIN_GROUP``, behind a fresh code); ``NOTIFY_URL`` hears of new
devices and admin actions. Every page speaks the visitor's language (their
browser's, or the one they pick on the page): English is here, each other
language one file in ``languages/`` beside this module.

Configuration is read from environment variables (see ``SETTINGS``), each with
a ``*_FILE`` variant for Docker/systemd secrets.

What it is not: there are no passwords, no user directory, no OAuth/OIDC and
no second factor. One factor, the TOTP code, guarded by replay protection and
guessing limits; the README gives the arithmetic.
"""

__version__ = "4.0.0"

import sys

if __name__ == "__main__" and "_hashlib" not in sys.modules:
    # Served from this file (`python -m forward_auth`, as the README, the unit and the container
    # run it): the cipher library (keys at rest) carries an OpenSSL of its own, and hashlib's would
    # map a second one, 3.3 MB of the 30 MB SPEC allows. SHA-1, SHA-256 and HMAC then come from
    # CPython's built-in implementations: the same digests (RFC 6238's vectors run on them in
    # test_the_served_process_maps_one_openssl_and_signs_in), and constant-time compare_digest.
    sys.modules["_hashlib"] = None

import base64
import bisect
import collections
import contextlib
import enum
import functools
import gc
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import signal
import sqlite3
import string
import threading
import time
import urllib.parse

import pyotp

# --- Constants and errors ---------------------------------------------------

STEP = 30  # RFC 6238 §4: time step X, in seconds
WINDOW = (-1, 0, 1)  # RFC 6238 §5.2: accept one step of clock skew either way
# Six ASCII digits (str.isdigit() admits full-width ones), with at most one space or
# hyphen in the middle, as authenticator apps show a code ("332 123").
CODE_SHAPE = re.compile(r"([0-9]{3})[ -]?([0-9]{3})", re.ASCII)
USER_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}", re.ASCII)
MAX_FORM_BYTES = 8 * 1024
MAX_QUERY_FIELDS = 32
DEVICE_COOKIE_SECONDS = 400 * 86400  # the longest Max-Age browsers keep (RFC 6265bis)
MAX_LOCKOUT_SECONDS = 86400
REFRESH_SECONDS = 0.5  # how often /verify looks for changes made by another process
LAST_USED_SECONDS = 60  # app tokens' last-used times are written at most this often
PURGE_SECONDS = 3600  # expired revocations and session records are deleted this often
TOKEN_CHECK_SECONDS = 0.1  # an unknown app token looks in the database at most this often
LOG_EVERY_SECONDS = 60  # a repeated refusal (forbidden host, bad app token) is logged once a minute
TOKEN_CACHE_SIZE = 1024  # signed Cookie headers whose claims are kept (by digest)
USER_AGENT_CHARS = 120
SCHEMA_VERSION = 7
SEALED_SINCE = 5  # the schema from which every database holds a storage key check value
STORAGE_KEY_BYTES = 32  # AES-256's key length: the least a storage key may hold
SECRET_SETTINGS = ("jwt_secret", "storage_key", "notify_url")  # never shown by repr() (a URL may hold a token)
BINARY_FILES = ("STORAGE_KEY",)  # read as bytes from their *_FILE: a random key is not text
MAX_FILE_SETTING = 4096  # the most a *_FILE setting or a key file may hold

HS256_HEADER = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"  # b64url('{"alg":"HS256","typ":"JWT"}')
B64URL = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
APP_TOKEN_PREFIX = "fat_"  # GitHub-style: a prefix makes a leaked token recognisable
APP_TOKEN_SHAPE = re.compile(r"fat_[A-Za-z0-9_-]{43}", re.ASCII)  # 256 random bits
INVITE_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}", re.ASCII)  # 256 random bits
HOST_PORT = re.compile(
    r"(?P<host>[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?", re.ASCII
)
HOST_PATTERN = re.compile(
    r"(?P<wild>\*\.)?(?P<host>[a-z0-9_-]+(\.[a-z0-9_-]+)*|\[[0-9a-f:.]+\])(?::(?P<port>[0-9]{1,5}))?", re.ASCII
)
EVERY_HOST = "*"
DEFAULT_PORTS = {"http": 80, "https": 443}
LOOPBACK = ("127.0.0.0/8", "::1/128")
NOTIFY_TIMEOUT_SECONDS = 5  # a receiver that is slower is given up on (and logged once a minute)
NOTIFY_EVERY_SECONDS = 60  # at most one notice per user and event this often
MAX_HELD_NOTICES = 20  # more within a minute are in the history only
SHOWN_ONCE_SECONDS = 600  # a new link or token waits this long to be shown, once
HISTORY_PAGE_ROWS = 200  # the admin page's history shows the newest this many

STATUS_LINES = {  # the statuses this service answers (http.HTTPStatus would cost an import)
    200: "200 OK",
    302: "302 Found",
    303: "303 See Other",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    403: "403 Forbidden",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    410: "410 Gone",
    413: "413 Content Too Large",
    415: "415 Unsupported Media Type",
    429: "429 Too Many Requests",
    500: "500 Internal Server Error",
    503: "503 Service Unavailable",
}
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Verdict(enum.Enum):
    """What a check decides; the values are the metrics' labels (a DENY is counted by how it was
    answered: `deny`, or `redirect` for a browser sent to the login page)."""

    ALLOW = "allow"
    FORBIDDEN = "forbidden"  # a valid user who may not open this host
    DENY = "deny"  # no valid session
    BAD_TOKEN = "bad_token"  # a forward-auth app token that is not (or no longer) valid
    RENEW = "renew"  # a valid session past half its idle lifetime: through the login host once


class Outcome(enum.Enum):
    """How a login attempt ended, for the limiter, the metrics and the log."""

    SUCCESS = "success"
    FAILURE = "failure"
    REPLAY = "replay"
    LIMITED = "limited"
    CSRF = "csrf"
    CROSS_SITE = "cross-site"
    UNDECIDED = "undecided"  # the database failed: neither counted nor reset


log = logging.getLogger("forward_auth")


class HTTPError(Exception):
    """An HTTP answer other than success, raised by a handler. With `say` (a key of the pages' texts),
    a browser gets it as an error page in its language; anything else gets `body`."""

    def __init__(self, status, body=b"", headers=(), say=None):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = list(headers)
        self.say = say


class ConfigError(ValueError):
    """A setting with a bad value; the message names the variable."""


class _Sayable(Exception):
    """An error the admin page says in the visitor's language: `say` a key of the pages' texts,
    `values` what it fills in; the command line prints the English message."""

    def __init__(self, message, say=None, **values):
        super().__init__(message)
        self.say, self.values = say, values


class UsageError(_Sayable):
    """A value given is wrong (a command line, a form field): one line, exit 2 or a 400, nothing changed."""


class CommandError(_Sayable):
    """A task could not be done (no such user, a file exists, the last admin): one line, exit 1 or a page."""


class LastAdmin(RuntimeError):
    """A change from the admin page would leave ADMIN_GROUP without an enrolled member: not made."""


class DatabaseInUse(RuntimeError):
    """A command that must run alone (-rekey, -restore) while a server holds the database."""


def bounded_memo(function, size=1024, longest=2048):
    """`function` with its answers kept, for the check path's repeated header values.

    Only arguments of at most `longest` characters in all are kept, and the
    whole memo is dropped when it holds `size`: a stranger sending many long
    headers costs at most size × longest. None answers and errors are not kept.
    """
    memo = {}

    @functools.wraps(function)
    def remembered(*args):
        answer = memo.get(args)
        if answer is None:
            answer = function(*args)
            if answer is not None and sum(len(a) for a in args if isinstance(a, str)) <= longest:
                if len(memo) >= size:
                    memo.clear()
                memo[args] = answer
        return answer

    return remembered


# --- Hosts ------------------------------------------------------------------
# One grammar for a host (`name[:port]`, lower case, no trailing dot, no default
# port) and one rule that matches it against patterns, whoever asks: the check's
# host lists, app tokens, redirects after a login, BASIC_AUTH_HOSTS, -token.


@bounded_memo  # the check path sees the same few hosts over and over
def normalise_host(host, scheme):
    """`host[:port]` lower-cased, without a trailing dot or the scheme's default port; None if malformed."""
    match = HOST_PORT.fullmatch(host or "")
    if not match:
        return None
    name = match["host"].lower().rstrip(".")
    port = match["port"]
    if not name or ".." in name or name.startswith("."):
        return None
    if port is not None:
        if not 0 < int(port) <= 65535:
            return None
        if int(port) != DEFAULT_PORTS.get(scheme):
            return f"{name}:{int(port)}"
    return name


def host_and_port(url):
    """(host name, port) of an absolute URL this module built; the port is the scheme's default if none."""
    scheme, _, rest = url.partition("://")
    return split_host(rest.split("/", 1)[0], DEFAULT_PORTS[scheme])


@bounded_memo
def split_host(host, default_port=None):
    """("name", port or default_port) of a normalised `host[:port]` (IPv6 in brackets)."""
    name, sep, port = host.rpartition(":")
    if not sep or name.endswith("[") or (host.startswith("[") and not name.endswith("]")):
        return host, default_port
    return name, int(port)


class HostList:
    """Host patterns parsed once; `matches(host, port)` is the one host rule.

    `*` matches every host; `*.example.com` any depth of subdomain, never
    example.com itself (on a dot boundary, so not evilexample.com); a pattern
    without a port any port (as Authelia and tinyauth), `host:port` that port
    only. Hosts are normalised (lower case, no trailing dot). Names are one
    dictionary lookup, so a list of 20 costs what a list of one does.
    """

    __slots__ = ("every", "names", "wildcards")

    def __init__(self, patterns):
        self.every = EVERY_HOST in patterns
        self.names = {}  # name -> ports it may have (None: any)
        self.wildcards = []  # (".example.com", port or None)
        for pattern in patterns:
            name, port = split_host(pattern)
            if name.startswith("*."):
                self.wildcards.append((name[1:], port))
            elif port is None or self.names.get(name, ()) is not None:
                self.names[name] = None if port is None else {*self.names.get(name, ()), port}

    def matches(self, host, port):
        if self.every:
            return True
        if host in self.names:
            ports = self.names[host]
            if ports is None or port in ports:
                return True
        return any(
            host.endswith(suffix) and len(host) > len(suffix) and wanted in (None, port)
            for suffix, wanted in self.wildcards
        )


def host_matches(host, port, pattern):
    """Whether (host, port) is matched by one host pattern (see HostList)."""
    return HostList((pattern,)).matches(host, port)


def redirect_allowed(scheme, host, login_host, settings):
    """Whether a login may return to `host` (normalised host[:port]) over `scheme`: the login
    host, COOKIE_DOMAIN or a subdomain of it, or a host ALLOWED_REDIRECT_HOSTS matches."""
    if host == login_host:
        return True
    name, port = split_host(host, DEFAULT_PORTS[scheme])
    domain = (settings.cookie_domain or "").lstrip(".")
    if domain and (name == domain or name.endswith("." + domain)):
        return True
    return HostList(settings.allowed_redirect_hosts).matches(name, port)


def patterns_overlap(a, b):
    """Whether some host[:port] matches both host patterns."""
    if EVERY_HOST in (a, b):
        return True
    (name_a, port_a), (name_b, port_b) = split_host(a), split_host(b)
    if port_a is not None and port_b is not None and port_a != port_b:
        return False
    if name_a.startswith("*.") and name_b.startswith("*."):
        return name_a.endswith(name_b[1:]) or name_b.endswith(name_a[1:]) or name_a == name_b
    if name_a.startswith("*."):
        return host_matches(name_b, None, name_a)
    if name_b.startswith("*."):
        return host_matches(name_a, None, name_b)
    return name_a == name_b


# --- Settings ---------------------------------------------------------------


def as_bool(value):
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _as_int(value, low, high):
    if not re.fullmatch(r"[0-9]+", value.strip(), re.ASCII):
        raise ValueError("expected a whole number")
    number = int(value)
    if not low <= number <= high:
        raise ValueError(f"expected a number from {low} to {high}")
    return number


def as_port(value):
    return _as_int(value, 0, 65535)


def as_seconds(value):
    return _as_int(value, 1, 10 * 365 * 86400)


def as_count(value):
    return _as_int(value, 1, 1_000_000)


def as_threads(value):
    return _as_int(value, 1, 256)


def as_host(value):
    value = value.strip()
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", value, re.ASCII):
            raise ValueError("expected an IP address or a host name") from None
    return value


def as_text(value):
    if not value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("expected non-empty text without control characters")
    return value


def as_secret(value):
    if len(value) < 32:
        raise ValueError("must be at least 32 characters")
    return value


def as_cookie_name(value):
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value, re.ASCII):
        raise ValueError("expected 1-64 of A-Z a-z 0-9 _ -")
    return value


def as_cookie_domain(value):
    value = value.strip().lower()
    if value.endswith(".") and value != ".":
        value = value[:-1]  # a trailing dot names the same domain (as for hosts everywhere else)
    if value == "":
        return None
    bare = value.removeprefix(".")
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*", bare):
        raise ValueError("expected a domain such as .example.com")
    return value


def as_same_site(value):
    lowered = value.strip().lower()
    if lowered not in ("lax", "strict", "none"):
        raise ValueError("expected lax, strict or none")
    return lowered.capitalize()


def as_networks(value):
    """`loopback`, `true` (every peer), `false` (none) or a comma list of IPs/CIDRs."""
    lowered = value.strip().lower()
    if lowered == "true":
        return ("0.0.0.0/0", "::/0")
    if lowered in ("false", "none", ""):
        return ()
    networks = []
    for item in (item.strip() for item in lowered.split(",")):
        if item == "loopback":
            networks.extend(LOOPBACK)
            continue
        try:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR") from None
    return tuple(networks)


def as_login_url(value):
    value = value.strip()
    if value.startswith("/") and not value.startswith("//") and "\\" not in value:
        if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", value, re.ASCII):
            raise ValueError("expected a path such as /login")
    else:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in DEFAULT_PORTS or "@" in parts.netloc or normalise_host(parts.netloc, parts.scheme) is None:
            raise ValueError("expected /path or an absolute http(s) URL")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query or fragment")
        if not re.fullmatch(r"(/[A-Za-z0-9._~/-]*)?", parts.path, re.ASCII):
            raise ValueError("its path must be plain, such as /login")  # it is printed in links and logs
    login_url_of(value)  # ValueError for a path that would take another route's place
    return value


# Where the login page is: the one rule every route, link, redirect and cookie path
# uses (`LOGIN_URL=/sso/login` routes /sso/login and /sso/logout, and every link
# says so). `base`: scheme://host of an absolute LOGIN_URL, else None; `host`: its
# normalised host (no trailing dot, no default port), else None.
LoginURL = collections.namedtuple("LoginURL", "url path logout_path base host")


RESERVED_PATHS = ("/verify", "/auth", "/health", "/metrics")


def login_url_of(value):
    """The LoginURL of a LOGIN_URL that as_login_url accepted; ValueError for one whose login or
    logout path would take another route's place."""
    parts = urllib.parse.urlsplit(value)
    path = parts.path or "/"
    logout_path = path.rstrip("/").rpartition("/")[0] + "/logout"
    if path in RESERVED_PATHS or logout_path in RESERVED_PATHS or path == logout_path or (
            {".", ".."} & set(path.split("/"))):
        raise ValueError(f"{path} would take the place of another of forward-auth's paths (/verify, /auth, "
                         "/health, /metrics, its logout) or is not a plain path")
    if not parts.scheme:
        return LoginURL(path, path, logout_path, None, None)
    host = normalise_host(parts.netloc, parts.scheme)
    base = f"{parts.scheme}://{host}"
    return LoginURL(base + path, path, logout_path, base, host)


def as_host_pattern(value):
    """One host pattern, lower-cased: `*`, `host[:port]` or `*.domain[:port]`; ValueError otherwise.

    The one validator for -allow, --hosts, ALLOWED_REDIRECT_HOSTS and BASIC_AUTH_HOSTS;
    host_matches() is the one rule that reads them.
    """
    pattern = value.strip().lower()
    if pattern == EVERY_HOST:
        return pattern
    if pattern.endswith(".") and not pattern.endswith("*."):
        pattern = pattern[:-1]  # a trailing dot names the same host
    match = HOST_PATTERN.fullmatch(pattern)
    if not match or ".." in pattern:
        raise ValueError(f"{value!r} is not a host pattern (host, *.domain or *, with an optional :port)")
    if match["port"] is not None and not 0 < int(match["port"]) <= 65535:
        raise ValueError(f"{value!r}: the port must be from 1 to 65535")
    return pattern


def as_host_patterns(value):
    """A comma list of host patterns (empty: none)."""
    return tuple(as_host_pattern(item) for item in value.split(",") if item.strip())


def as_redirect_hosts(value):
    """ALLOWED_REDIRECT_HOSTS: host patterns, but never `*` (a login must not return anywhere)."""
    patterns = as_host_patterns(value)
    if EVERY_HOST in patterns:
        raise ValueError("'*' would let a login return to any site; name the hosts")
    return patterns


def as_storage_key(value):
    """Key material: STORAGE_KEY's text as UTF-8, or STORAGE_KEY_FILE's bytes. A key file may be
    binary (`head -c 32 /dev/urandom`), whose last byte can be a newline: one trailing newline is
    dropped only when 32 bytes remain, so a text file saved with one matches the same STORAGE_KEY."""
    if isinstance(value, str):
        as_secret(value)
        return value.encode()
    if len(value) > MAX_FILE_SETTING:
        raise ValueError(f"must be at most {MAX_FILE_SETTING} bytes (is it the key file?)")
    if value.endswith(b"\n") and len(value) > STORAGE_KEY_BYTES:
        value = value[:-1]
    if len(value) < STORAGE_KEY_BYTES:
        raise ValueError(f"must be at least {STORAGE_KEY_BYTES} bytes (make one with: head -c 32 /dev/urandom)")
    return value


def as_group(value):
    """ADMIN_GROUP: a group name as -user --groups takes it, or empty for no admin page."""
    value = value.strip()
    if value and not USER_NAME.fullmatch(value):
        raise ValueError("expected a group name (1-64 of A-Z a-z 0-9 . _ @ -), or empty for no admin page")
    return value


def as_days(value):
    return _as_int(value, 1, 3650)


def as_notify_url(value):
    """NOTIFY_URL: an http(s) URL (ntfy, Gotify-style receivers), or with apprise installed any
    Apprise URL (ntfy://, mailto://, tgram://). Empty: nothing is sent. The error never repeats
    the value: a receiver's URL may carry its token."""
    value = value.strip()
    if not value:
        return ""
    parts = urllib.parse.urlsplit(value)
    if parts.scheme in DEFAULT_PORTS:
        if not parts.hostname or any(c.isspace() or ord(c) < 32 for c in value):
            raise ValueError("expected an http(s) URL such as https://ntfy.sh/my-household")
        return value
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*", parts.scheme or "", re.ASCII) or not parts.netloc:
        raise ValueError("expected an http(s) URL, or an Apprise URL (ntfy://, mailto://, ...)")
    import importlib.util  # only for a non-http URL: is apprise there to send it?

    if importlib.util.find_spec("apprise") is None:
        raise ValueError(f"a {parts.scheme}:// URL needs the apprise package (pip install apprise); "
                         "an http(s) URL needs nothing")
    return value


def as_log_format(value):
    lowered = value.strip().lower()
    if lowered not in ("text", "json"):
        raise ValueError("expected text or json")
    return lowered


# (field, environment variable, default, converter); None: unset by default.
SETTINGS = (
    ("host", "HOST", "127.0.0.1", as_host),
    ("port", "PORT", "3000", as_port),
    ("db_path", "DB_PATH", "auth.db", as_text),
    ("jwt_secret", "JWT_SECRET", None, as_secret),
    ("storage_key", "STORAGE_KEY", None, as_storage_key),  # unset: the key file beside the database
    ("session_ttl", "SESSION_TTL_SECONDS", "86400", as_seconds),  # the idle lifetime
    ("session_max", "SESSION_MAX_SECONDS", "2592000", as_seconds),  # the cap from the login
    ("cookie_name", "COOKIE_NAME", "auth_token", as_cookie_name),
    ("cookie_domain", "COOKIE_DOMAIN", "", as_cookie_domain),
    ("secure_cookies", "SECURE_COOKIES", "true", as_bool),
    ("same_site", "SAME_SITE", "lax", as_same_site),
    ("trust_proxy", "TRUST_PROXY", "loopback", as_networks),
    ("login_url", "LOGIN_URL", "/login", as_login_url),
    ("allowed_redirect_hosts", "ALLOWED_REDIRECT_HOSTS", "", as_redirect_hosts),
    ("max_login_attempts", "MAX_LOGIN_ATTEMPTS", "5", as_count),
    ("rate_limit_window", "RATE_LIMIT_WINDOW_SECONDS", "900", as_seconds),
    ("global_max_failures", "GLOBAL_MAX_FAILURES", "30", as_count),
    ("app_name", "APP_NAME", "Forward Auth", as_text),
    ("log_format", "LOG_FORMAT", "text", as_log_format),
    ("threads", "THREADS", "8", as_threads),
    ("invite_ttl", "INVITE_TTL_SECONDS", "259200", as_seconds),
    ("basic_auth_hosts", "BASIC_AUTH_HOSTS", "", as_host_patterns),
    ("admin_group", "ADMIN_GROUP", "admins", as_group),  # empty: no admin page
    ("admin_fresh", "ADMIN_FRESH_SECONDS", "600", as_seconds),  # how old a code may be for the admin page
    ("history_days", "HISTORY_DAYS", "90", as_days),
    ("notify_url", "NOTIFY_URL", "", as_notify_url),  # empty: no notices
)


class Settings:
    """The validated configuration, frozen. Fields are SETTINGS' first column;
    defaults are its defaults, converted; `login` is the LoginURL of `login_url`.
    Tests build Settings(port=0, ...)."""

    __slots__ = (*(field for field, *_ in SETTINGS), "login", "storage_key_source")

    def __init__(self, storage_key_source="STORAGE_KEY", **values):
        object.__setattr__(self, "storage_key_source", storage_key_source)  # named in a wrong-key error
        unknown = set(values) - {field for field, *_ in SETTINGS}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        for field, _name, default, convert in SETTINGS:
            value = values[field] if field in values else (None if default is None else convert(default))
            object.__setattr__(self, field, value)
        if self.session_max < self.session_ttl:
            raise ConfigError("SESSION_MAX_SECONDS: must be at least SESSION_TTL_SECONDS (the cap of a session "
                              "cannot be shorter than its idle lifetime)")
        if self.same_site == "None" and not self.secure_cookies:
            raise ConfigError("SAME_SITE: none needs SECURE_COOKIES=true (browsers refuse it otherwise)")
        try:
            object.__setattr__(self, "login", login_url_of(self.login_url))
        except ValueError as error:
            raise ConfigError(f"LOGIN_URL: {error}") from None
        domain = (self.cookie_domain or "").strip(".")
        login_host = self.login.host and urllib.parse.urlsplit(self.login.url).hostname
        if domain and login_host and not (login_host == domain or login_host.endswith("." + domain)):
            # The browser would drop the session cookie the login host sets.
            raise ConfigError(f"COOKIE_DOMAIN: the login host {login_host} is not inside {self.cookie_domain}")

    def __setattr__(self, name, value):
        raise AttributeError("Settings are frozen")

    def __repr__(self):
        shown = (f"{f}={'<secret>' if f in SECRET_SETTINGS and v else repr(v)}" for f, v in self._items())
        return f"Settings({', '.join(shown)})"

    def __eq__(self, other):
        return isinstance(other, Settings) and list(self._items()) == list(other._items())

    __hash__ = None

    def _items(self):
        return ((field, getattr(self, field)) for field in self.__slots__)

    @classmethod
    def from_env(cls, environ):
        """Settings from a mapping of environment variables; ConfigError names a bad one."""
        values = {}
        for field, name, default, convert in SETTINGS:
            raw = _read_variable(environ, name, default)
            if raw is None:
                continue
            try:
                values[field] = convert(raw)
            except ValueError as error:
                given = f"{name}_FILE" if name in BINARY_FILES and f"{name}_FILE" in environ else name
                raise ConfigError(f"{given}: {error}") from None
        if "STORAGE_KEY_FILE" in environ:
            values["storage_key_source"] = f"STORAGE_KEY_FILE ({environ['STORAGE_KEY_FILE']})"
        return cls(**values)


def _read_variable(environ, name, default):
    """The value of NAME, or of the file NAME_FILE names (one trailing newline stripped; a binary
    one, the storage key, as bytes for its converter to judge)."""
    path = environ.get(name + "_FILE")
    if path is not None and name in environ:
        raise ConfigError(f"{name}: set {name} or {name}_FILE, not both")
    if path is None:
        return environ.get(name, default)
    binary = name in BINARY_FILES
    try:
        with open(path, "rb" if binary else "r", **({} if binary else {"encoding": "utf-8"})) as file:
            value = file.read(MAX_FILE_SETTING + 1)  # bounded: /dev/zero must not fill memory
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{name}_FILE: cannot read {path!r} ({error.__class__.__name__})") from None
    if len(value) > MAX_FILE_SETTING:
        raise ConfigError(f"{name}_FILE: {path!r} is longer than {MAX_FILE_SETTING} bytes")
    return value if binary else value.removesuffix("\n")


def cookie_domain_warning(settings, patterns):
    """One line naming the fix when an absolute LOGIN_URL's session cookie cannot reach a host a
    user may open (knowable from the host patterns `patterns`: `*` says nothing), else None. The
    login host sets the cookie for itself, or for COOKIE_DOMAIN; a host outside both never gets
    it, so a correct code there ends on the login page again (or a 404), with nothing in the log."""
    login_host = settings.login.host and split_host(settings.login.host)[0]
    if not login_host:
        return None  # a relative LOGIN_URL: the cookie is set on each app's own host
    domain = (settings.cookie_domain or "").strip(".")
    for pattern in patterns:
        name = split_host(pattern)[0].removeprefix("*.")
        if pattern == EVERY_HOST or _cookie_reaches(settings, login_host, name):
            continue
        shared = _shared_parent(login_host, name)
        fix = (f"set COOKIE_DOMAIN=.{shared}" if shared and not domain else
               f"widen COOKIE_DOMAIN to .{shared}" if shared else "serve the login page under the apps' own domain")
        reach = f"COOKIE_DOMAIN={settings.cookie_domain} does not cover it" if domain else "COOKIE_DOMAIN is unset"
        return (f"LOGIN_URL is on {login_host}, and its session cookie cannot reach {name} ({reach}): "
                f"{fix}, or a sign-in for {name} never sticks")
    return None


def cookie_reach_warning(settings, host):
    """The line for a browser sent to an absolute LOGIN_URL from `host` (normalised, no port),
    which that login host's cookie cannot reach, else None. `host` is the request's word, so the
    line names it cut short and takes no advice from it: the fix it names comes from the login
    host alone (a stranger's `evil.example.net` must not say "widen COOKIE_DOMAIN to .example.net")."""
    login_host = settings.login.host and split_host(settings.login.host)[0]
    if not login_host or _cookie_reaches(settings, login_host, host):
        return None
    domain = (settings.cookie_domain or "").strip(".")
    parent = login_host.partition(".")[2]
    example = f" (such as .{parent})" if "." in parent else ""
    fix = (f"if it is one of your apps, set COOKIE_DOMAIN to the domain they share with {login_host}{example}"
           if not domain else f"if it is one of your apps, serve it under {settings.cookie_domain}")
    return (f"a browser was sent to the login page on {login_host} from {host[:80]}, which its session cookie "
            f"cannot reach (COOKIE_DOMAIN {'is unset' if not domain else 'does not cover it'}): {fix}")


def _cookie_reaches(settings, login_host, name):
    """Whether the session cookie the login host sets reaches host `name`: the login host itself,
    or COOKIE_DOMAIN and its subdomains (the browser's Domain rule, RFC 6265 §5.1.3)."""
    domain = (settings.cookie_domain or "").strip(".")
    return name == login_host or bool(domain) and (name == domain or name.endswith("." + domain))


def _shared_parent(a, b):
    """The longest domain two host names share with at least two labels (home.example.com), or None."""
    common = []
    for left, right in zip(reversed(a.split(".")), reversed(b.split(".")), strict=False):
        if left != right:
            break
        common.insert(0, left)
    return ".".join(common) if len(common) >= 2 else None


# --- Keys at rest -----------------------------------------------------------
# With a code-only login the seed is the whole credential, so the database keeps every
# seed (users' and pending invitations') and the stored cookie key sealed under a storage
# key kept apart from it: a copied database or backup alone opens nothing. The cipher is
# the `cryptography` package's AES-256-GCM (no cipher of our own), imported when a key is
# first used: the check path never seals or opens anything.

SEALED = re.compile(r"fa4:([A-Za-z0-9_-]{38,})", re.ASCII)  # ':' is not base32: never a plain seed
CHECK_PLACE, CHECK_TEXT = "meta:value:storage_check", "forward-auth storage key check"


class Unsealable(Exception):
    """A stored value that does not open under this key: damaged, copied from another row, or
    sealed under another key. Never taken to mean "no value"."""


class StorageKey:
    """AES-256-GCM under a key derived from the storage key with HKDF-SHA256 (RFC 5869), and a
    fingerprint derived apart from it (so that printing it tells nothing of the cipher's key).

    Each value gets a fresh random 96-bit nonce (NIST SP 800-38D §8.2.2: a household's few
    hundred values per key are far below the 2³² a random nonce allows), and associated data
    naming its place, `users:seed:alice`: a value copied onto another row does not open.
    `source` says where the key came from, for the one line a wrong key gets.
    """

    def __init__(self, material, source):
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self.source = source
        self._aead = AESGCM(self._derive(material, b"forward-auth seeds at rest: AES-256-GCM"))
        self._invalid = InvalidTag
        self.fingerprint = hashlib.sha256(self._derive(material, b"forward-auth key fingerprint")).hexdigest()[:8]

    @staticmethod
    def _derive(material, info):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)

    def seal(self, text, place):
        nonce = os.urandom(12)
        sealed = nonce + self._aead.encrypt(nonce, text.encode(), place.encode())
        return "fa4:" + base64.urlsafe_b64encode(sealed).rstrip(b"=").decode()

    def open(self, value, place):
        """The text sealed at `place`, or Unsealable."""
        match = SEALED.fullmatch(value) if isinstance(value, str) else None
        if match is None:
            raise Unsealable(place)
        try:
            raw = base64.urlsafe_b64decode(match[1] + "=" * (-len(match[1]) % 4))
            return self._aead.decrypt(raw[:12], raw[12:], place.encode()).decode()
        except (self._invalid, ValueError):  # ValueError: base64 of an impossible length, or not UTF-8
            raise Unsealable(place) from None

    def check_value(self):
        return self.seal(CHECK_TEXT, CHECK_PLACE)

    def opens(self, check_value):
        try:
            return self.open(check_value, CHECK_PLACE) == CHECK_TEXT
        except Unsealable:
            return False


class KeySource:
    """Where a database's storage key comes from: STORAGE_KEY(_FILE), or the key file beside the
    database, made on the first start of a database that holds nothing sealed yet."""

    def __init__(self, material=None, name="STORAGE_KEY", key_file=None):
        self.material, self.name, self.key_file = material, name, key_file

    @classmethod
    def of(cls, settings):
        if settings.storage_key is not None:
            return cls(settings.storage_key, settings.storage_key_source)
        return cls.beside(settings.db_path)

    @classmethod
    def beside(cls, db_path):
        """The key file beside the database (never in it), for when STORAGE_KEY is unset."""
        path = db_path + ".key"
        return cls(None, f"the key file {path}", path)

    @property
    def staged(self):
        """Where a -rekey writes the new key before the database is sealed under it, to be renamed
        over the key file after (None: the key is given, there is no file to replace)."""
        return self.key_file and self.key_file + ".new"

    def stage(self, material):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.staged)  # left by a rekey that stopped before its rename
        _write_key_file(self.staged, material)

    def replace_with_staged(self):
        os.replace(self.staged, self.key_file)
        _sync_directory(self.key_file)

    def finish_rekey(self, check_value):
        """A -rekey that stopped between sealing and replacing the key file left the new key staged:
        if that one opens the database, finish the rename (one log line) and return its
        StorageKey; else None."""
        if not self.staged or not os.path.isfile(self.staged):
            return None
        key = StorageKey(read_key_file(self.staged, f"the key file {self.staged}"), self.name)
        if not key.opens(check_value):
            return None
        self.replace_with_staged()
        log.warning("a -rekey had stopped before replacing %s: finished it (the new key is in place)", self.key_file)
        return key

    def load(self, sealed_already):
        """The StorageKey; ConfigError when the key is missing for a database that needs it."""
        if self.material is not None:
            return StorageKey(self.material, self.name)
        if not os.path.exists(self.key_file) and not sealed_already:
            _write_key_file(self.key_file, secrets.token_bytes(STORAGE_KEY_BYTES))
        return StorageKey(read_key_file(self.key_file, self.name, missing=(
            "the database's seeds are sealed with it: put the key file back from where you keep it, or set "
            "STORAGE_KEY_FILE to it (without it no one can sign in)")), self.name)


def read_key_file(path, name, missing="no such file"):
    """A key file's bytes (at least 32), or ConfigError naming it."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_FILE_SETTING + 1)  # bounded: `-rekey /dev/urandom` must not fill memory
    except FileNotFoundError:
        raise ConfigError(f"{name} is missing: {missing}") from None
    except OSError as error:
        raise ConfigError(f"{name}: cannot read it ({error.strerror})") from None
    try:
        return as_storage_key(raw)
    except ValueError as error:
        raise ConfigError(f"{name}: {error}") from None


def _write_key_file(path, material):
    """Create a key file, 0600, and make it durable (the file and its directory entry)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, material)
        os.fsync(fd)
    finally:
        os.close(fd)
    _sync_directory(path)


def _sync_directory(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- Storage ----------------------------------------------------------------


User = collections.namedtuple(
    "User", "name seed created last_login last_step hosts full_name email groups",
    defaults=(EVERY_HOST, "", "", ""),
)
AppToken = collections.namedtuple("AppToken", "user label hosts created expires last_used")
Invite = collections.namedtuple("Invite", "user seed expires browser opened")


def invite_readable(invite):
    """Whether a stored invitation holds what this module writes (a hand-edited one may hold anything)."""
    user, seed, expires, browser, opened = invite
    return (isinstance(user, str) and USER_NAME.fullmatch(user) is not None and isinstance(seed, str)
            and type(expires) is int and (browser is None or isinstance(browser, str))
            and (opened is None or type(opened) is int))


class SessionRecord(collections.namedtuple("SessionRecord", "jti user created expires ip agent sid seen issued",
                                           defaults=(None, None, None))):
    """A login as the sessions table keeps it (`created`: the login time, `sid`: the session's id,
    both kept across renewals; `seen`: when it was last used, as -sessions shows it; `issued`: the
    current token's issue time)."""

    def row(self):
        return (self.jti, self.user, int(self.created), int(self.expires), self.ip, self.agent[:USER_AGENT_CHARS],
                self.sid or self.jti, self.issued)


# What the check path holds of a user: its host patterns (None: every host), when
# its sessions were last ended (-logout, a reset by -invite), and who it is for the apps.
Rule = collections.namedtuple("Rule", "hosts sessions_after full_name email groups")
# `revoked`: {jti: expires} of the revocations after the `since` a snapshot was asked for;
# `revoked_seq`: the highest revocation number the database ever gave (see MIGRATIONS[4]).
Snapshot = collections.namedtuple("Snapshot", "version rules deleted revoked app_tokens revoked_seq")

# Each version's statements; a database at version N runs those above N, in one transaction.
MIGRATIONS = {
    1: (
        """CREATE TABLE users (
            name TEXT PRIMARY KEY,
            seed TEXT NOT NULL,
            created INTEGER NOT NULL,
            last_login INTEGER,
            last_step INTEGER NOT NULL DEFAULT 0)""",
        "CREATE TABLE revoked (jti TEXT PRIMARY KEY, expires INTEGER NOT NULL)",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        # When a name was last deleted: its older sessions stay dead if the name comes back.
        "CREATE TABLE deleted (name TEXT PRIMARY KEY, at INTEGER NOT NULL)",
    ),
    2: (
        # Space-separated host patterns; `*` is every host, as in 1.0.
        "ALTER TABLE users ADD COLUMN hosts TEXT NOT NULL DEFAULT '*'",
        # Sessions issued before this second are over (-logout, a reset by -invite).
        "ALTER TABLE users ADD COLUMN sessions_after INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE app_tokens (
            hash TEXT PRIMARY KEY,
            user TEXT NOT NULL,
            label TEXT NOT NULL,
            hosts TEXT NOT NULL,
            created INTEGER NOT NULL,
            expires INTEGER,
            last_used INTEGER,
            UNIQUE (user, label))""",
        # A pending seed per user; users.seed is '' until a new user's link is used.
        """CREATE TABLE invites (
            user TEXT PRIMARY KEY,
            hash TEXT NOT NULL UNIQUE,
            seed TEXT NOT NULL,
            expires INTEGER NOT NULL)""",
        """CREATE TABLE sessions (
            jti TEXT PRIMARY KEY,
            user TEXT NOT NULL,
            created INTEGER NOT NULL,
            expires INTEGER NOT NULL,
            ip TEXT NOT NULL,
            agent TEXT NOT NULL)""",
        # A database that ever had a user never gets a fresh first user at start.
        """INSERT OR IGNORE INTO meta SELECT 'had_user', '1'
            WHERE EXISTS (SELECT 1 FROM users) OR EXISTS (SELECT 1 FROM deleted)""",
    ),
    3: (
        # Who a user is for the apps behind (Remote-Name, Remote-Email, Remote-Groups).
        "ALTER TABLE users ADD COLUMN full_name TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE users ADD COLUMN email TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE users ADD COLUMN groups_list TEXT NOT NULL DEFAULT ''",  # comma-separated
        # The browser an invitation was opened in (SHA-256 of its cookie), and when.
        "ALTER TABLE invites ADD COLUMN browser TEXT",
        "ALTER TABLE invites ADD COLUMN opened INTEGER",
        # One id for a session across its renewals (its first token's jti), so a logout
        # with an older token of it still ends the renewed one.
        "ALTER TABLE sessions ADD COLUMN sid TEXT",
    ),
    4: (
        # Revocations numbered in the order they are made (AUTOINCREMENT never reuses a
        # number, even after a purge), so a reload reads only those it has not seen.
        """CREATE TABLE revoked_numbered (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            jti TEXT NOT NULL UNIQUE,
            expires INTEGER NOT NULL)""",
        "INSERT INTO revoked_numbered (jti, expires) SELECT jti, expires FROM revoked ORDER BY rowid",
        "DROP TABLE revoked",
        "ALTER TABLE revoked_numbered RENAME TO revoked",
    ),
    # 4.0 seals the seeds and the cookie key (SealedFile.unlock does it, with the key): an older
    # version must refuse the database, not take every sealed seed for a damaged one.
    5: (),
    6: (
        # Who signed in, and what the admins did: never a code, seed, key, token or link.
        # `user`: whose account (None: a code that matched nobody); `actor`: the admin who
        # did it (None: the person themselves; '' the command line); `device`: 'known' or
        # 'new' for a sign-in, else ''; `detail`: what changed (hosts, a token's label).
        """CREATE TABLE history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            at INTEGER NOT NULL,
            event TEXT NOT NULL,
            user TEXT,
            actor TEXT,
            ip TEXT NOT NULL,
            agent TEXT NOT NULL,
            device TEXT NOT NULL,
            detail TEXT NOT NULL)""",
        "CREATE INDEX history_at ON history (at)",
        # When the session was last used (written in batches, at most once a minute).
        "ALTER TABLE sessions ADD COLUMN seen INTEGER",
    ),
    7: (
        # When the session's current token was issued (its `iat`): a lowered SESSION_TTL_SECONDS
        # ends a session that long after it, and -sessions must not list it past then (NULL:
        # a record from before 4.0, judged by its expiry alone).
        "ALTER TABLE sessions ADD COLUMN issued INTEGER",
    ),
}


NO_CAP = 2**40  # seconds: a lifetime no session reaches
USER_COLUMNS = "name, seed, created, last_login, last_step, hosts, full_name, email, groups_list"


class HistoryEntry(collections.namedtuple("HistoryEntry", "at event user actor ip agent device detail",
                                          defaults=(None, None, "", "", "", ""))):
    """One line of the history: what happened (`event`), to whose account (`user`), done by whom
    (`actor`: an admin's name, '' the command line, None the person themselves), from where."""

    def row(self):
        return (int(self.at), self.event, self.user, self.actor, str(self.ip), (self.agent or "")[:USER_AGENT_CHARS],
                self.device, self.detail)
# The values sealed under the storage key: (table, the column naming the row, the sealed column).
# A value's place, its associated data, is table:column:row ("users:seed:alice").
SEALED_COLUMNS = (("users", "name", "seed"), ("invites", "user", "seed"), ("meta", "key", "value"))


def _hosts_text(patterns):
    return " ".join(patterns) if patterns else EVERY_HOST


def _hosts_rule(text):
    """The stored host list as the check uses it: None for every host, else a tuple of patterns."""
    patterns = tuple(text.split())
    return None if EVERY_HOST in patterns or not patterns else patterns


class SealedFile:
    """The storage key's side of the database file: the check value that proves a key, sealing a
    database from before 4.0 in place, sealing everything again under a new key (what is sealed
    where: SEALED_COLUMNS), and leaving no earlier value in the file's pages. It works on the
    Store's connection, inside the Store's transactions; `shown_as` names the file in errors."""

    def __init__(self, shown_as):
        self.shown_as = shown_as

    def unlock(self, conn, keys, version):
        """(the StorageKey of `keys` that opens this file, whether the file still needs a scrub); a
        database that holds nothing sealed yet (new, or from before 4.0, schema `version`) has
        its values sealed now."""
        check = self.meta(conn, "storage_check")
        if check is None:
            self._refuse_unless_from_before_sealing(conn, version)
        key = keys.load(sealed_already=check is not None)
        if check is None:
            self.reseal(conn, None, key)
        elif not key.opens(check):
            key = keys.finish_rekey(check) or self._wrong_key(conn, key)
        return key, self.meta(conn, "scrub_pending") is not None

    def _refuse_unless_from_before_sealing(self, conn, version):
        """Only a new database or one from before 4.0 may have its values sealed in place. One of 4.0
        without its check value, or an older one that holds sealed values, was written by hand:
        sealing what is plain in it would seal seeds someone chose (ConfigError)."""
        sealed = conn.execute(
            "SELECT 1 FROM users WHERE seed LIKE 'fa4:%' UNION ALL SELECT 1 FROM invites WHERE seed LIKE 'fa4:%' "
            "UNION ALL SELECT 1 FROM meta WHERE value LIKE 'fa4:%'").fetchone()
        if version >= SEALED_SINCE or sealed:
            raise ConfigError(f"{self.shown_as} holds no storage key check value, yet it is from 4.0 or holds sealed "
                              "values: it was damaged or written by hand; restore a backup you made")

    def _wrong_key(self, conn, key):
        stored = self.meta(conn, "storage_key_fingerprint")
        stored = stored if isinstance(stored, str) and re.fullmatch(r"[0-9a-f]{8}", stored) else "unknown"
        raise ConfigError(
            f"{key.source} does not open {self.shown_as}: its seeds are sealed with another key (fingerprint "
            f"{stored}, this key's is {key.fingerprint}); give it the key it was made with (STORAGE_KEY_FILE, or "
            "the key file beside it)")

    @staticmethod
    def meta(conn, key):
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row and row[0]

    def reseal(self, conn, old, new):
        """Seal every secret under `new`: opened with `old`, or (None) as stored before 4.0, in the
        clear. A value that does not open stays as it is (its user still cannot sign in); their
        places are returned. The cookie key is not carried over (see Store.rekey)."""
        stuck = []
        for table, row_column, column in SEALED_COLUMNS:
            rows = conn.execute(f"SELECT {row_column}, {column} FROM {table} WHERE {column} != ''"  # names fixed
                                + (" AND key = 'cookie_key'" if table == "meta" else "")).fetchall()
            for row, value in rows:
                place = f"{table}:{column}:{row}"
                try:
                    text = value if old is None else old.open(value, place)
                except Unsealable:
                    stuck.append(place)
                    continue
                if isinstance(text, str):
                    conn.execute(f"UPDATE {table} SET {column} = ? WHERE {row_column} = ?", (new.seal(text, place), row))
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('storage_check', ?)", (new.check_value(),))
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('storage_key_fingerprint', ?)", (new.fingerprint,))
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('scrub_pending', '1')")  # cleared by scrub
        return stuck

    def scrub(self, conn):
        """Leave no earlier value anywhere in the file: secure_delete zeroed what a change freed,
        VACUUM rewrites every page (its copy in memory, never a temporary file), and a truncating
        checkpoint writes them over the old pages and empties the WAL. Another program reading
        the database (an sqlite3 shell, a backup tool) keeps the checkpoint from finishing: then the
        flag 'scrub_pending' stays, one line says so, and the next open tries again."""
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("VACUUM")
        if self._checkpointed(conn):
            conn.execute("DELETE FROM meta WHERE key = 'scrub_pending'")
            if self._checkpointed(conn):
                return True
        log.warning("another program is reading %s: the values as they were before sealing stay in its pages until "
                    "it stops; forward-auth finishes this at its next start", self.shown_as)
        return False

    @staticmethod
    def _checkpointed(conn):
        busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return busy == 0 and frames == copied


class Store:
    """The SQLite file and what forward-auth keeps in it: users, sessions, app
    tokens, invitations and the cookie key, the secrets among them sealed under
    the storage key (what is sealed, and where, is in SEALED_COLUMNS).

    One connection for queries and writes, one for noticing changes other
    processes commit (``PRAGMA data_version`` only moves for other connections)
    and for writes that must not wait; each is guarded by a lock because
    waitress serves from several threads. The schema and its migrations are in
    one place (MIGRATIONS). One short method per query, returning plain tuples;
    a change that must be whole is one transaction.
    """

    def __init__(self, path, keys=None, hold=None, shown_as=None):
        """Open (or create) the database, migrate it and check its storage key (`keys`, a KeySource:
        by default the key file beside it). `hold`: "shared" for a server, "exclusive" for a command
        that must run alone (see hold_database). `shown_as`: its name in errors (a backup's)."""
        self.path = path
        self.shown_as = shown_as or path
        try:
            _create_private_file(path)
        except OSError as error:
            raise OSError(f"cannot open the database {path}: {error.strerror}") from None
        self._held = hold_database(path, hold) if hold else None
        self._conn = self._connect()
        self._lock = threading.Lock()
        self._sealed = SealedFile(self.shown_as)
        try:
            self.key = self._migrate(keys or KeySource.beside(path))
        except BaseException:
            self._conn.close()
            self._release()
            raise
        self._watch = self._connect()
        # The watch connection is used from /verify and /logout: never let it wait long.
        self._watch.execute("PRAGMA busy_timeout = 100")
        self._watch_lock = threading.Lock()
        self._history = None  # the history's connection, opened on its first line (see record)
        self._history_lock = threading.Lock()

    def _connect(self, synchronous="FULL"):
        conn = sqlite3.connect(self.path, timeout=5, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: an accepted TOTP step must survive a power cut, or a code could be replayed.
        conn.execute(f"PRAGMA synchronous = {synchronous}")  # one of two fixed words
        # Deleted and replaced values are zeroed in the file, not left in free space.
        conn.execute("PRAGMA secure_delete = ON")
        return conn

    def _release(self):
        if self._held is not None:
            os.close(self._held)
            self._held = None

    @contextlib.contextmanager
    def _transaction(self, quick=False):
        """One write transaction on the main connection (or the quick one, which waits 100 ms at most)."""
        conn, lock = (self._watch, self._watch_lock) if quick else (self._conn, self._lock)
        with lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _migrate(self, keys):
        """Bring the schema up to date and open the storage key, in one transaction; a database
        that holds nothing sealed yet (new, or from before 4.0) has its values sealed in place,
        and then no page of the file, nor of its WAL, keeps a plain one. The StorageKey."""
        with self._transaction() as conn:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"database schema {version} is newer than this program")
            if version < 0:
                raise sqlite3.DatabaseError(f"database schema {version} is not one forward-auth writes")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            key, scrub = self._sealed.unlock(conn, keys, version)
        if scrub:
            self._scrub()
        return key

    def _scrub(self):
        with self._lock:
            return self._sealed.scrub(self._conn)

    def _query(self, sql, params=()):
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _write(self, sql, params=()):
        """Run one statement in its own transaction; return the rows it changed."""
        with self._lock:
            return self._conn.execute(sql, params).rowcount

    def ping(self):
        self._query("SELECT count(*) FROM users")

    def data_version(self):
        with self._watch_lock:
            return self._watch.execute("PRAGMA data_version").fetchone()[0]

    def backup(self, destination):
        """Copy the database with SQLite's online backup; the file must not exist."""
        _create_private_file(destination, exclusive=True)
        target = sqlite3.connect(destination)
        try:
            with self._lock:
                self._conn.backup(target)
            target.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, no -wal beside it
        finally:
            target.close()

    def close(self):
        # Under the locks: closing a connection another thread is using can crash SQLite.
        with self._lock, self._watch_lock, self._history_lock:
            self._conn.close()
            self._watch.close()
            if self._history is not None:
                self._history.close()
        self._release()

    # -- The storage key --

    def rekey(self, new):
        """Seal every secret under `new` (a StorageKey) in one transaction, with a fresh cookie key:
        a rekey follows a key that may have leaked, and an old backup opened with it must not
        mint cookies. (The places that did not open (their users need a reset), and whether the
        old values are gone from every page: see _scrub.)"""
        with self._transaction() as conn:
            stuck = self._sealed.reseal(conn, self.key, new)
            conn.execute("DELETE FROM meta WHERE key = 'cookie_key'")
        self.key = new
        scrubbed = self._scrub()
        return [place for place in stuck if not place.startswith("meta:")], scrubbed

    # -- The cookie key --

    def cookie_key(self):
        """The generated HMAC key, created once by whichever process asks first and kept sealed;
        ConfigError if the stored one does not open or is not what this module writes (64 hex
        digits): never guess a key."""
        place = "meta:value:cookie_key"
        self._write("INSERT OR IGNORE INTO meta VALUES ('cookie_key', ?)", (self.key.seal(secrets.token_hex(32), place),))
        try:
            stored = self.key.open(self._query("SELECT value FROM meta WHERE key = 'cookie_key'")[0][0], place)
        except Unsealable:
            stored = None
        if stored is None or not re.fullmatch(r"[0-9a-f]{64}", stored, re.ASCII):
            raise ConfigError(f"the cookie key stored in {self.path} is damaged: set JWT_SECRET, or delete it "
                              "(sqlite3 DB \"DELETE FROM meta WHERE key = 'cookie_key'\"; every session and "
                              "device cookie then ends)")
        return bytes.fromhex(stored)

    # -- Users --

    def add_user(self, name, seed, now):
        """True if added, False if the name is taken. `seed` '' adds a pending user."""
        sealed = self.key.seal(seed, f"users:seed:{name}") if seed else ""
        try:
            with self._transaction() as conn:
                conn.execute("INSERT INTO users (name, seed, created) VALUES (?, ?, ?)", (name, sealed, int(now)))
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('had_user', '1')")
        except sqlite3.IntegrityError:
            return False
        return True

    def record_server(self, settings):
        """At start: the settings the command line must judge by as this server does (where its
        login page is, for the links it prints; the lifetimes, for the sessions it lists),
        whatever environment a command runs in."""
        with self._transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [
                ("login_url", settings.login_url), ("session_ttl", str(settings.session_ttl)),
                ("session_max", str(settings.session_max))])

    def recorded(self, key):
        """A value record_server wrote, or None (also for one that is not text: nothing read from
        the database may become a traceback)."""
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows and isinstance(rows[0][0], str) else None

    def recorded_lifetimes(self):
        """(SESSION_TTL_SECONDS, SESSION_MAX_SECONDS) the running server recorded; a missing or
        unusable one: no cap (the token's own expiry decides)."""
        def seconds(key):
            value = self.recorded(key)
            return int(value) if value and value.isdecimal() and len(value) < 12 else NO_CAP
        return seconds("session_ttl"), seconds("session_max")

    def had_user(self):
        """Whether this database ever held a user (a first user is created only in one that never did)."""
        return bool(self._query("SELECT 1 FROM meta WHERE key = 'had_user'"))

    def delete_user(self, name, now, keep_admin=None):
        """True if the user existed; their sessions issued until `now`, tokens and invitation go too.
        `keep_admin`: a group that must keep an enrolled member (else LastAdmin, nothing changed)."""
        with self._transaction() as conn:
            gone = conn.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 1
            if gone:
                conn.execute("INSERT OR REPLACE INTO deleted VALUES (?, ?)", (name, int(now)))
                for table in ("app_tokens", "invites", "sessions"):
                    conn.execute(f"DELETE FROM {table} WHERE user = ?", (name,))  # the table names are fixed
            self._still_an_admin(conn, keep_admin)
            return gone

    @staticmethod
    def _still_an_admin(conn, group):
        """In the transaction of the change, so that two admins removing each other at once cannot
        both pass: the second one's transaction sees the first one's change."""
        if group and conn.execute("SELECT 1 FROM users WHERE seed != '' AND instr(',' || groups_list || ',', "
                                  "',' || ? || ',') > 0", (group,)).fetchone() is None:
            raise LastAdmin(group)

    def users(self):
        """Every user, each `seed` as stored: sealed ('' for a pending user)."""
        return [User(*row) for row in self._query(f"SELECT {USER_COLUMNS} FROM users ORDER BY created, name")]

    def active_users(self):
        """Users who can log in (a pending user has no seed yet), with their seeds opened;
        None for a seed that does not open under this key."""
        return [user._replace(seed=self._opened(user.seed, f"users:seed:{user.name}"))
                for user in self.users() if user.seed]

    def _opened(self, value, place):
        try:
            return self.key.open(value, place)
        except Unsealable:
            return None

    def user(self, name):
        rows = self._query(f"SELECT {USER_COLUMNS} FROM users WHERE name = ?", (name,))
        return User(*rows[0]) if rows else None

    def set_hosts(self, name, patterns):
        """Replace NAME's host patterns; False if there is no such user."""
        return self._write("UPDATE users SET hosts = ? WHERE name = ?", (_hosts_text(patterns), name)) == 1

    def set_identity(self, name, *, full_name=None, email=None, groups=None, keep_admin=None):
        """Replace the given fields of NAME's identity (None: keep); False if there is no such user."""
        with self._transaction() as conn:
            changed = self._set_identity(conn, name, full_name, email, groups)
            self._still_an_admin(conn, keep_admin)
            return changed

    def _set_identity(self, conn, name, full_name=None, email=None, groups=None):
        changes = {"full_name": full_name, "email": email, "groups_list": None if groups is None else ",".join(groups)}
        changes = {column: value for column, value in changes.items() if value is not None}
        if not changes:
            return conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is not None
        assignments = ", ".join(f"{column} = ?" for column in changes)  # the column names are fixed above
        return conn.execute(f"UPDATE users SET {assignments} WHERE name = ?", (*changes.values(), name)).rowcount == 1

    # -- Logins and sessions --

    def accept_login(self, name, step, session):
        """Record a login at TOTP step `step` and its session; False if that step or a later one was used.

        One transaction: the step is stored before any cookie is sent (RFC 6238 §5.2).
        """
        with self._transaction() as conn:
            changed = conn.execute(
                "UPDATE users SET last_step = ?, last_login = ? WHERE name = ? AND last_step < ? AND seed != ''",
                (step, session.created, name, step),
            ).rowcount
            if changed == 1:
                self._record_session(conn, session)
            return changed == 1

    @staticmethod
    def _record_session(conn, session):
        conn.execute("DELETE FROM sessions WHERE expires <= ?", (session.created,))
        conn.execute("INSERT OR REPLACE INTO sessions (jti, user, created, expires, ip, agent, sid, issued) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", session.row())

    def renew_session(self, old_jti, old_expires, session):
        """Replace a session's token: the old `jti` revoked, the record carried on under the new one.

        False if the old `jti` was revoked meanwhile (a logout, or another renewal of the same
        token a moment ago): then nothing is renewed, and one session never forks into two.
        """
        try:
            with self._transaction() as conn:
                conn.execute("INSERT INTO revoked (jti, expires) VALUES (?, ?)", (old_jti, int(old_expires)))
                self._carry_session(conn, old_jti, session)
        except sqlite3.IntegrityError:
            return False
        return True

    def _carry_session(self, conn, old_jti, session):
        carried = conn.execute(
            "UPDATE sessions SET jti = ?, expires = ?, sid = coalesce(sid, ?), issued = ? WHERE jti = ?",
            (session.jti, int(session.expires), session.sid, session.issued, old_jti),
        ).rowcount
        if not carried:  # a session without a record (issued by 1.0, or pruned): it gets one now
            self._record_session(conn, session)

    def end_session(self, sid):
        """Revoke the current token of the session `sid` (a renewal may have replaced the one presented)."""
        with self._transaction() as conn:
            # coalesce: a session a 2.0 server issued has no sid, its id is its jti.
            conn.execute("INSERT OR REPLACE INTO revoked (jti, expires) SELECT jti, expires FROM sessions "
                         "WHERE coalesce(sid, jti) = ? AND jti IS NOT NULL", (sid,))

    def end_sessions(self, name, now):
        """End every session of NAME issued until now; False if there is no such user."""
        with self._transaction() as conn:
            return self._end_sessions(conn, name, now)

    @staticmethod
    def _end_sessions(conn, name, now):
        # sessions_after covers sessions without a row (issued by 1.0); the
        # revocations cover those issued earlier in this same second.
        if conn.execute("UPDATE users SET sessions_after = ? WHERE name = ?", (int(now), name)).rowcount != 1:
            return False
        conn.execute(
            "INSERT OR REPLACE INTO revoked (jti, expires) SELECT jti, expires FROM sessions "
            "WHERE user = ? AND expires > ? AND jti IS NOT NULL",
            (name, int(now)),
        )
        return True

    def end_what_a_backup_brought_back(self, now, step):
        """After a restore: end every session (one signed out since the backup must not come back),
        void every invitation (one used since the backup would enrol a second phone), take every
        code up to TOTP step `step` as used (one typed just before the backup was put back must
        not work twice), and number revocations on from those there are. The names of the users
        whose invitation was voided."""
        with self._transaction() as conn:
            for (name,) in conn.execute("SELECT name FROM users").fetchall():
                self._end_sessions(conn, name, now)
            conn.execute("UPDATE users SET last_step = max(last_step, ?)", (step,))
            # A number that cannot grow would make every later revocation fail ("database is full").
            conn.execute("UPDATE sqlite_sequence SET seq = (SELECT coalesce(max(seq), 0) FROM revoked) "
                         "WHERE name = 'revoked'")
            voided = [name for (name,) in conn.execute("SELECT user FROM invites ORDER BY user")]
            conn.execute("DELETE FROM invites")
            # The settings a server recorded when the backup was made may be those of another day (an
            # old login host): the next start records its own, and until then commands use theirs.
            conn.execute("DELETE FROM meta WHERE key IN ('login_url', 'session_ttl', 'session_max')")
            return voided

    def live_sessions(self, name, now, lifetimes=None):
        """Sessions not expired and not ended, newest first, each expiring when the Gate says: at
        the token's own expiry, or sooner by the (SESSION_TTL_SECONDS, SESSION_MAX_SECONDS) of
        `lifetimes` (None: the running server's, as it recorded them at its start), which a
        lower setting applies to sessions already issued."""
        ttl, longest = lifetimes or self.recorded_lifetimes()
        sql = """SELECT * FROM (
                     SELECT s.jti, s.user, s.created,
                            min(s.expires, coalesce(s.issued + ?, s.expires), s.created + ?) AS ends,
                            s.ip, s.agent, coalesce(s.sid, s.jti), s.seen, s.issued, s.rowid AS r
                     FROM sessions s JOIN users u ON u.name = s.user
                     WHERE s.created >= u.sessions_after AND s.jti NOT IN (SELECT jti FROM revoked)
                     AND (? IS NULL OR s.user = ?))
                 WHERE ends > ? ORDER BY created DESC, r DESC"""
        rows = self._query(sql, (ttl, longest, name, name, int(now)))
        return [SessionRecord(*row[:9]) for row in rows]

    def revoke(self, revocations, quick=False):
        """Store {jti: expires}; `quick` waits at most 100 ms for a lock (then sqlite3.Error)."""
        with self._transaction(quick) as conn:
            conn.executemany("INSERT OR REPLACE INTO revoked (jti, expires) VALUES (?, ?)", revocations.items())

    def current_token(self, sid, now):
        """(jti, expires) of the session `sid`'s live token (renewed a moment ago by another request), or None."""
        rows = self._query("SELECT jti, expires FROM sessions WHERE sid = ? AND expires > ? "
                           "AND jti NOT IN (SELECT jti FROM revoked)", (sid, int(now)))
        return rows[0] if rows and isinstance(rows[0][1], int) else None

    def purge_expired(self, now, history_before=None):
        """Delete revocations and session records of tokens that expired: they need neither; and
        the history before `history_before` (HISTORY_DAYS)."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM revoked WHERE expires <= ?", (int(now),))
            conn.execute("DELETE FROM sessions WHERE expires <= ?", (int(now),))
            if history_before is not None:
                conn.execute("DELETE FROM history WHERE at < ?", (int(history_before),))

    def touch_sessions(self, seen):
        """Write a batch of {jti: last seen}."""
        with self._transaction(quick=True) as conn:
            conn.executemany("UPDATE sessions SET seen = max(coalesce(seen, 0), ?) WHERE jti = ?",
                             [(int(when), jti) for jti, when in seen.items()])

    def accept_fresh_code(self, name, step):
        """A code typed for the admin page: refused (False) if that step or a later one was used
        (RFC 6238 §5.2, as a sign-in: the code just used to sign in, too)."""
        return self._write("UPDATE users SET last_step = ? WHERE name = ? AND last_step < ? AND seed != ''",
                           (step, name, step)) == 1

    # -- History --

    def record(self, entry):
        """Keep one HistoryEntry, on a connection of its own with synchronous=NORMAL: a sign-in then
        waits for one fsync (its TOTP step's), not two. A power cut may lose the last lines (the WAL
        is synced by the next FULL commit or checkpoint); a process that dies loses none."""
        with self._history_lock:
            if self._history is None:
                self._history = self._connect(synchronous="NORMAL")
            self._history.execute("INSERT INTO history (at, event, user, actor, ip, agent, device, detail) "
                                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", entry.row())

    def history(self, name=None, since=0, limit=-1):
        """HistoryEntry rows since `since`, of NAME (as the account or the admin who acted) or of all, newest first."""
        sql = """SELECT at, event, user, actor, ip, agent, device, detail FROM history
                 WHERE at >= ? AND (? IS NULL OR user = ? OR actor = ?) ORDER BY at DESC, id DESC LIMIT ?"""
        return [HistoryEntry(*row) for row in self._query(sql, (int(since), name, name, name, limit))]

    # -- App tokens --

    def add_app_token(self, name, label, digest, hosts, now, expires):
        """Store a token's hash; RuntimeError for an unknown user or a label in use."""
        try:
            with self._transaction() as conn:
                if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is None:
                    raise RuntimeError(f"no user named {name!r}")
                conn.execute(
                    "INSERT INTO app_tokens VALUES (?, ?, ?, ?, ?, ?, NULL)",
                    (digest, name, label, _hosts_text(hosts), int(now), expires),
                )
        except sqlite3.IntegrityError:
            raise RuntimeError(f"{name!r} already has a token labelled {label!r}") from None

    def app_tokens(self, name=None):
        sql = """SELECT user, label, hosts, created, expires, last_used FROM app_tokens
                 WHERE ? IS NULL OR user = ? ORDER BY user, created, label"""
        return [AppToken(*row) for row in self._query(sql, (name, name))]

    def delete_app_token(self, name, label):
        return self._write("DELETE FROM app_tokens WHERE user = ? AND label = ?", (name, label)) == 1

    def touch_app_tokens(self, last_used):
        """Write a batch of {hash: last used}."""
        with self._transaction(quick=True) as conn:
            conn.executemany(
                "UPDATE app_tokens SET last_used = max(coalesce(last_used, 0), ?) WHERE hash = ?",
                [(int(when), digest) for digest, when in last_used.items()],
            )

    # -- Invitations --

    def create_invite(self, name, digest, seed, now, expires, keep_tokens=False, hosts=None, identity=None,
                      keep_admin=None):
        """A pending seed for NAME; a new NAME is created pending, an existing one is reset. `hosts`
        (patterns) and `identity` (set_identity's fields) are set in the same transaction.

        Returns True for a new user. A reset (a lost phone) ends the current seed,
        every session and, unless `keep_tokens`, the app tokens now: a calendar
        client on the lost phone holds one. The host list and device cookies stay
        (a device only narrows which seed a code is tried against). An earlier
        invitation is void.
        """
        with self._transaction() as conn:
            new = conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is None
            if new:
                conn.execute("INSERT INTO users (name, seed, created) VALUES (?, '', ?)", (name, int(now)))
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('had_user', '1')")
            else:
                conn.execute("UPDATE users SET seed = '' WHERE name = ?", (name,))
                self._end_sessions(conn, name, now)
                if not keep_tokens:
                    conn.execute("DELETE FROM app_tokens WHERE user = ?", (name,))
            if hosts is not None:
                conn.execute("UPDATE users SET hosts = ? WHERE name = ?", (_hosts_text(hosts), name))
            self._set_identity(conn, name, **(identity or {}))
            conn.execute(
                "INSERT OR REPLACE INTO invites (user, hash, seed, expires) VALUES (?, ?, ?, ?)",
                (name, digest, self.key.seal(seed, f"invites:seed:{name}"), int(expires)),
            )
            self._still_an_admin(conn, keep_admin)
            return new

    def invite(self, digest, now):
        """The live invitation with this hash, its seed opened (None if it does not open), or None."""
        rows = self._query(
            "SELECT user, seed, expires, browser, opened FROM invites WHERE hash = ? AND expires > ?", (digest, int(now))
        )
        if not rows:
            return None
        invite = Invite(*rows[0])
        return invite._replace(seed=self._opened(invite.seed, f"invites:seed:{invite.user}"))

    def invites(self):
        """{user: Invite} of every invitation, live or not, seeds sealed."""
        rows = self._query("SELECT user, seed, expires, browser, opened FROM invites")
        return {row[0]: Invite(*row) for row in rows}

    def open_invite(self, digest, browser, now):
        """Bind a live invitation to `browser` (a hash) unless another browser has it; True if it is this one's."""
        with self._transaction() as conn:
            conn.execute(
                "UPDATE invites SET browser = ?, opened = ? WHERE hash = ? AND expires > ? AND browser IS NULL",
                (browser, int(now), digest, int(now)),
            )
            row = conn.execute("SELECT browser FROM invites WHERE hash = ?", (digest,)).fetchone()
            return row is not None and row[0] == browser

    def accept_invite(self, digest, browser, step, session):
        """Activate the invitation's seed at `step`, end it, and record the session; False if it is gone
        (used, voided or expired meanwhile) or was opened in another browser."""
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT user, seed FROM invites WHERE hash = ? AND expires > ? AND browser = ?",
                (digest, session.created, browser),
            ).fetchone()
            seed = row and self._opened(row[1], f"invites:seed:{row[0]}")
            if seed is None:
                return False
            conn.execute(
                "UPDATE users SET seed = ?, last_step = ?, last_login = ? WHERE name = ?",
                (self.key.seal(seed, f"users:seed:{row[0]}"), step, session.created, row[0]),
            )
            conn.execute("DELETE FROM invites WHERE hash = ?", (digest,))
            self._record_session(conn, session)
            return True

    # -- What the check path reads --

    def snapshot(self, since=0):
        """The Snapshot the check path works from, read through the watch connection: every user,
        deletion and app token, and the revocations numbered after `since` (all of them when the
        database was replaced by one that numbered fewer)."""
        with self._watch_lock:
            conn = self._watch
            (version,) = conn.execute("PRAGMA data_version").fetchone()
            conn.execute("BEGIN")
            try:
                rules = {
                    name: Rule(hosts, after, full_name, email, groups)
                    for name, hosts, after, full_name, email, groups in conn.execute(
                        "SELECT name, hosts, sessions_after, full_name, email, groups_list FROM users"
                    )
                }
                deleted = dict(conn.execute("SELECT name, at FROM deleted"))
                row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'revoked'").fetchone()
                revoked_seq = row[0] if row and type(row[0]) is int else 0  # else: read them all
                since = since if since <= revoked_seq else 0
                revoked = dict(conn.execute("SELECT jti, expires FROM revoked WHERE seq > ?", (since,)))
                app_tokens = {
                    digest: AppToken(user, label, hosts, created, expires, None)
                    for digest, user, label, hosts, created, expires in conn.execute(
                        "SELECT hash, user, label, hosts, created, expires FROM app_tokens"
                    )
                }
            finally:
                conn.execute("COMMIT")
            return Snapshot(version, rules, deleted, revoked, app_tokens, revoked_seq)


def _create_private_file(path, exclusive=False):
    """Create `path` with mode 0600 before SQLite opens it (SQLite would use the umask)."""
    flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if exclusive else 0)
    os.close(os.open(path, flags, 0o600))


def hold_database(path, mode):
    """Mark a database as in use by a server ("shared": several may serve it; waits while a
    -rekey or -restore runs), or take it alone ("exclusive": refused while a server holds it).
    The open descriptor that holds it.

    An flock(2) on the database file itself, held while the Store is open: the kernel drops it
    when the process ends, however it ends, so no stale pid file can block a -rekey. Linux keeps
    flock apart from SQLite's POSIX locks; its one hazard, that closing any descriptor of the file
    drops the process's POSIX locks, is avoided by closing it last (Store.close). A -restore puts
    a new file in place, so a shared holder checks it holds the file that is there now.
    """
    import fcntl

    while True:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if mode == "shared" else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatabaseInUse(f"a server (or another command) is using {path}: stop it first (systemctl stop "
                                "forward-auth), then run this again") from None
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            return fd
        os.close(fd)  # replaced while this waited: hold the new one


def schema_of(conn):
    """A database's schema as sqlite_master holds it (whitespace aside), to compare."""
    rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    return sorted((kind, name, table, " ".join((sql or "").split())) for kind, name, table, sql in rows)


def schema_of_version(version):
    """The schema this module's migrations make, up to `version`."""
    conn = sqlite3.connect(":memory:")
    try:
        for step in range(1, version + 1):
            for statement in MIGRATIONS[step]:
                conn.execute(statement)
        return schema_of(conn)
    finally:
        conn.close()


def digest(token):
    """How app tokens and invitations are stored: SHA-256, hex (the token has 256 random bits)."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()



# --- Tokens -----------------------------------------------------------------
# A signed cookie is readable and replayable by whoever holds it: it carries
# no secret, it expires (`exp`), and the server can still say no (`jti`).


def _b64encode(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text):
    """Strict base64url without padding; ValueError on anything else."""
    if not B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64encode(data) != text:  # non-zero trailing bits: a second spelling of the same bytes
        raise ValueError("not canonical base64url")
    return data


def _signature(signing_input, key):
    return _b64encode(hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest())


def sign_token(claims, key):
    """An HS256 JWT (RFC 7519) for `claims`."""
    payload = _b64encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signing_input = f"{HS256_HEADER}.{payload}"
    return f"{signing_input}.{_signature(signing_input, key)}"


def verify_token(token, key, now):
    """(claims, None) for a valid unexpired token, else (None, reason)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None, "malformed"
    header, payload, signature = parts
    if header != HS256_HEADER:  # exactly the header sign_token writes: no alg, kid or jku to follow
        return None, "algorithm"
    if not B64URL.fullmatch(payload) or not B64URL.fullmatch(signature) or not hmac.compare_digest(
        signature, _signature(f"{header}.{payload}", key)
    ):
        return None, "signature"
    try:
        claims = json.loads(_b64decode(payload))  # signed by us: no hostile nesting past this point
    except (ValueError, RecursionError):
        return None, "malformed"
    if not _claims_well_formed(claims):
        return None, "claims"
    if claims["exp"] <= now:
        return None, "expired"
    return claims, None


# The claims forward-auth writes and their types; `auth_time` and `sid` are absent from 2.0's tokens.
CLAIM_TYPES = {"sub": str, "jti": str, "iat": int, "exp": int, "auth_time": int, "sid": str}
REQUIRED_CLAIMS = {"sub", "jti", "iat", "exp"}


def _claims_well_formed(claims):
    """Only our claims, each of its type (bool is not an int here): an odd claim is a refusal, never an error later."""
    return (
        isinstance(claims, dict)
        and REQUIRED_CLAIMS <= claims.keys() <= CLAIM_TYPES.keys()
        and all(type(value) is CLAIM_TYPES[name] for name, value in claims.items())
    )


def new_claims(subject, now, lifetime, auth_time=None):
    """Claims of a fresh token; `auth_time` (OIDC's name) is the login a renewed session keeps."""
    now = int(now)
    auth_time = now if auth_time is None else auth_time
    return {"sub": subject, "iat": now, "exp": now + lifetime, "jti": secrets.token_urlsafe(16), "auth_time": auth_time}


def session_id(claims):
    """The id of the session these claims belong to: its first token's `jti`, carried by renewals."""
    return claims.get("sid", claims["jti"])


def login_time(claims):
    """When the session of these claims began: `auth_time`, kept across renewals; a 2.0 token's `iat`."""
    return claims.get("auth_time", claims["iat"])


def derive_key(key, purpose):
    """A separate key per cookie kind, so a device cookie never passes as a session."""
    return hmac.new(key, b"forward-auth/" + purpose.encode(), hashlib.sha256).digest()


# --- TOTP -------------------------------------------------------------------


def step_at(now):
    """The RFC 6238 time step (T) for a Unix time."""
    return int(now // STEP)


def new_seed():
    return pyotp.random_base32()  # 160 bits, as RFC 4226 §4 recommends


def code_digits(code):
    """The six digits of a well-formed code ("332 123" is 332123), else None."""
    match = CODE_SHAPE.fullmatch(code) if isinstance(code, str) else None
    return match[1] + match[2] if match else None


def usable_seed(seed):
    """Whether a stored seed is base32 pyotp can use (a hand-edited database may hold anything)."""
    try:
        pyotp.TOTP(seed).byte_secret()
    except (ValueError, TypeError):  # binascii.Error is a ValueError
        return False
    return bool(seed)


def match_code(code, users, now):
    """(user, step) for the first user whose code at step-1, step or step+1 is `code`, else None.

    Every user and every step is tried, so timing does not tell which matched.
    A match may still be a replay: the caller refuses steps not after `last_step`.
    Users must have usable seeds (see usable_seed).
    """
    digits = code_digits(code)
    if digits is None:
        return None
    given = digits.encode("ascii")
    step = step_at(now)
    matches = []
    for user in users:
        if not user.seed:
            continue  # pending: enrolment not finished
        totp = pyotp.TOTP(user.seed)
        for offset in WINDOW:
            if hmac.compare_digest(totp.generate_otp(step + offset).encode("ascii"), given):
                matches.append((user, step + offset))
    fresh = [(user, step) for user, step in matches if step > user.last_step]
    return (fresh or matches or [None])[0]


def enrolment_uri(seed, name, app_name):
    return pyotp.TOTP(seed).provisioning_uri(name=name, issuer_name=app_name)


# --- Rate limiter -----------------------------------------------------------


FULL_RETRY_SECONDS = 60  # Retry-After when the limiter is full of keys it must keep
DAY = 86400
# A key's failures in any 24 h: at most this many windows' worth, what a guesser who trips
# every doubling lockout gets on a first day (1 + ... + 7 windows' limits before 24 h ones).
DAILY_WINDOWS = 7
MAX_KEYS_PER_OWNER = 100  # device keys one user's device cookies may hold in the limiter


class _Bucket:
    __slots__ = ("failures", "in_flight", "last_trip", "locked_until", "lockout", "owner")

    def __init__(self, owner=None):
        self.owner = owner  # the user of a device key, else None
        self.failures = []  # times of failures in the last 24 h, oldest first (a list: deques weigh more)
        self.in_flight = 0  # attempts let through and not yet decided
        self.locked_until = 0.0
        self.lockout = 0
        self.last_trip = None


class RateLimiter:
    """Failed-login counters per key (device or client IP) and one global ceiling.

    A key (or the ceiling) that reaches its limit within `window` seconds trips:
    it is locked for one window, doubled for each trip within 24 h of the last,
    up to 24 h. Clients with a device cookie are counted per device only; all
    others also share the global ceiling, or (an invitation's first code) a
    `group` key of their own instead. Attempts in flight count toward the limit,
    so parallel guesses cannot slip past it.

    Every key and the ceiling also have a budget per 24 h (DAILY_WINDOWS
    windows' worth), so pacing one under the limit gains nothing over tripping.

    At most `max_keys` keys are kept, and a key is made only for an attempt
    that goes ahead: a refused attempt remembers nothing. When full, only keys
    that remember nothing are dropped; a key with a failure or a trip in the
    last day, or an attempt in flight, is never forgotten to make room: a new
    key is refused instead (fail closed), so volume cannot buy a locked device
    more guesses or erase its doubling. Filling the table takes failures the
    budgets ration (210 a day for all anonymous clients, 35 per invitation) or
    devices, of which one user holds at most MAX_KEYS_PER_OWNER places.
    """

    def __init__(self, max_attempts, window, global_max, *, max_keys=10_000, clock=time.time):
        self.max_attempts = max_attempts
        self.window = window
        self.global_max = global_max
        self.max_keys = max_keys
        self.clock = clock
        self._buckets = collections.OrderedDict()  # least recently used first
        self._global = _Bucket()
        self._full_until = 0.0  # full of keys worth keeping: a new key is refused until then
        self._owned = collections.Counter()  # user -> device keys held
        self._lock = threading.Lock()

    def acquire(self, key, device=False, now=None, group=None, owner=None):
        """Start an attempt: 0 if it may go ahead (then release() it), else seconds to wait.
        `owner`: the user a device key belongs to (each user's devices hold at most
        MAX_KEYS_PER_OWNER keys, so one user's minted devices cannot fill the table)."""
        now = self.clock() if now is None else now
        with self._lock:
            keys = self._keys(key, device, group)
            fresh = [k for k in keys if k is not None and k not in self._buckets]
            pairs = [(self._bucket(k) or _Bucket(owner if k == key else None), limit) for k, limit in keys.items()]
            wait = max(self._wait(bucket, limit, now) for bucket, limit in pairs)
            if wait == 0 and key in fresh and owner is not None and self._owned[owner] >= MAX_KEYS_PER_OWNER:
                wait = FULL_RETRY_SECONDS
            if wait == 0 and fresh:
                wait = self._make_room(len(fresh), now)
            if wait == 0:
                for (k, _), (bucket, _) in zip(keys.items(), pairs):
                    bucket.in_flight += 1
                    if k in fresh:
                        self._buckets[k] = bucket
                        if bucket.owner is not None:
                            self._owned[bucket.owner] += 1
                    if k is not None:
                        self._buckets.move_to_end(k)
            return wait

    def release(self, key, device=False, outcome=Outcome.FAILURE, now=None, group=None):
        """End an acquired attempt: a success resets its device or IP, an undecided one neither
        counts nor resets, anything else (a wrong code, a replay) counts as a failure."""
        now = self.clock() if now is None else now
        with self._lock:
            for k, limit in self._keys(key, device, group).items():
                bucket = self._bucket(k)
                if bucket is None:  # never: a key with an attempt in flight is kept
                    continue
                bucket.in_flight = max(0, bucket.in_flight - 1)
                if outcome not in (Outcome.SUCCESS, Outcome.UNDECIDED):
                    self._count(bucket, limit, now)
            bucket = self._buckets.get(key)
            if outcome is Outcome.SUCCESS and bucket is not None:
                # Reset in place: attempts of this key still in flight (another tab) are released
                # into it later, and the global ceiling's share of them with it.
                bucket.failures, bucket.locked_until, bucket.lockout, bucket.last_trip = [], 0.0, 0, None
                if not bucket.in_flight:
                    self._forget(key)

    def _bucket(self, key):
        return self._global if key is None else self._buckets.get(key)

    def _forget(self, key):
        bucket = self._buckets.pop(key)
        if bucket.owner is not None:
            self._owned[bucket.owner] -= 1
            if not self._owned[bucket.owner]:
                del self._owned[bucket.owner]

    def _keys(self, key, device, group):
        """{key: limit} an attempt counts toward; None is the global ceiling of anonymous clients."""
        keys = {key: self.max_attempts}
        if group is not None:
            keys["group:" + group] = self.max_attempts
        elif not device:
            keys[None] = self.global_max
        return keys

    def _make_room(self, needed, now):
        """0 when `needed` more keys fit, else seconds to wait: only keys that remember nothing
        are dropped; one sweep frees every such key at once."""
        if len(self._buckets) + needed <= self.max_keys:
            return 0
        if now < self._full_until <= now + 1:  # (a clock set back sweeps again)
            return FULL_RETRY_SECONDS  # swept a moment ago: no sweep per refused request
        for key in [key for key, bucket in self._buckets.items() if not self._worth(bucket, now)]:
            self._forget(key)
        if len(self._buckets) + needed <= self.max_keys - self.max_keys // 100:
            return 0
        self._full_until = now + 1  # nearly full still: sweep at most once a second
        return 0 if len(self._buckets) + needed <= self.max_keys else FULL_RETRY_SECONDS

    def _worth(self, bucket, now):
        """Whether forgetting a key would lose something: an attempt in flight, a lockout, a
        failure in the last day (its budget), or a trip within the last day (the next lockout doubles)."""
        if bucket.in_flight or bucket.locked_until > now:
            return True
        self._forget_old(bucket, now)
        return bool(bucket.failures) or (
            bucket.last_trip is not None and now - bucket.locked_until < MAX_LOCKOUT_SECONDS)

    def _wait(self, bucket, limit, now):
        if bucket.locked_until > now:
            # Never longer than the lockout itself, so a clock set back cannot stretch it.
            return math.ceil(min(bucket.locked_until - now, bucket.lockout))
        self._forget_old(bucket, now)
        if self._in_window(bucket, now) + bucket.in_flight >= limit:
            return 1  # the attempts in flight may reach the limit: ask again in a second
        if len(bucket.failures) + bucket.in_flight >= limit * DAILY_WINDOWS:
            # A budget per 24 h: a guesser who stays one under the limit every window (and so
            # never trips) gets no more in a day than one who trips every lockout.
            return max(1, math.ceil(bucket.failures[0] + DAY - now)) if bucket.failures else 1
        return 0

    def _in_window(self, bucket, now):
        return len(bucket.failures) - bisect.bisect_right(bucket.failures, now - self.window)

    def _forget_old(self, bucket, now):
        failures = bucket.failures
        if failures and failures[0] <= now - DAY:
            bucket.failures = failures[bisect.bisect_right(failures, now - DAY):]

    def _count(self, bucket, limit, now):
        self._forget_old(bucket, now)
        bucket.failures.append(now)
        if self._in_window(bucket, now) >= limit:
            # "Within 24 h of the last" counts from the end of the last lockout,
            # so a guesser who resumes as soon as a 24 h lockout ends stays at 24 h.
            recent = bucket.last_trip is not None and now - bucket.locked_until < MAX_LOCKOUT_SECONDS
            bucket.lockout = min(bucket.lockout * 2, MAX_LOCKOUT_SECONDS) if recent else self.window
            bucket.locked_until = now + bucket.lockout
            bucket.last_trip = now
            # The failures stay for the day's budget; the lockout (at least a window) outlasts
            # their place in the window.

    def failures(self, key, now):
        """Failed attempts of `key` within the window: a sign-in after some is worth a notice."""
        with self._lock:
            bucket = self._buckets.get(key)
            return 0 if bucket is None else self._in_window(bucket, now)


# --- History and notices ----------------------------------------------------
# Who signed in and what the admins did, kept in the database (HISTORY_DAYS) and,
# for what a household should hear of at once, sent to NOTIFY_URL. Neither ever
# holds a code, seed, key, token or link: the callers pass none, and a detail is
# only ever a name, a host list or a token's label.

class Throttle:
    """Says whether a key (a user and host, a client address) is due another log line; bounded."""

    def __init__(self, every=LOG_EVERY_SECONDS, max_keys=10_000):
        self.every = every
        self.max_keys = max_keys
        self._last = {}
        self._lock = threading.Lock()

    def due(self, key, now):
        with self._lock:
            last = self._last.get(key)
            if last is not None and 0 <= now - last < self.every:
                return False
            if len(self._last) >= self.max_keys:
                self._last.clear()  # a stranger's many addresses: forget, at worst log a line again
            self._last[key] = now
            return True


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(text):
    """Stored text made safe for a terminal: control characters (a tab that fakes a column, U+009B
    that starts a terminal command) as \\xNN escapes."""
    return CONTROL_CHARACTERS.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def format_time(epoch):
    """A stored time as UTC ISO 8601; "never" for none, "unreadable" for what a hand-edited database may hold."""
    if not epoch:
        return "never"
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    except (TypeError, ValueError, OverflowError, OSError):
        return "unreadable"


# event: (what the history and a notice say, whether it is notified). A sign-in is
# notified when it comes from a new device or after failed attempts (SignIn decides).
EVENTS = {
    "sign-in": ("signed in", False),
    "sign-in-failed": ("wrong code", False),
    "sign-in-replayed": ("code used twice, refused", False),
    "sign-in-limited": ("too many attempts, refused", False),
    "renewal": ("session renewed", False),
    "sign-out": ("signed out", False),
    "sign-out-everywhere": ("signed out everywhere", True),
    "fresh-code": ("typed a fresh code for the admin page", False),
    "fresh-code-failed": ("wrong code on the admin page", True),  # someone holds an admin's session
    "fresh-code-replayed": ("code used twice on the admin page, refused", False),
    "fresh-code-limited": ("too many attempts on the admin page, refused", False),
    "invitation-opened": ("opened their invitation", False),
    "invitation-used": ("set up their authenticator from an invitation", True),
    "invited": ("invited (a new person)", True),
    "reset": ("reset for a lost phone (a new invitation)", True),
    "hosts": ("hosts changed", True),
    "identity": ("name, email or groups changed", True),
    "sessions-ended": ("every session ended", True),
    "session-ended": ("one session ended", True),
    "deleted": ("deleted", True),
    "token-created": ("app token created", True),
    "token-revoked": ("app token revoked", True),
}
OUTCOME_EVENTS = {Outcome.SUCCESS: "", Outcome.FAILURE: "-failed", Outcome.REPLAY: "-replayed",
                  Outcome.LIMITED: "-limited"}


def attempt_event(event, outcome):
    """The history's name of an attempt at `event` ("sign-in", "fresh-code", an invitation's first
    code "invitation-used", which failing is a failed sign-in) that ended in `outcome`."""
    if event == "invitation-used":
        return event if outcome is Outcome.SUCCESS else "sign-in" + OUTCOME_EVENTS[outcome]
    return event + OUTCOME_EVENTS[outcome]


# Who did something: an admin on the page (their name), the command line (''), or the
# person themselves (None, on their own sign-in page).
Actor = collections.namedtuple("Actor", "name ip agent")
COMMAND_LINE = Actor("", "", "")  # no address, no browser: the history's "by" says it


class Notifier:
    """Sends notices to NOTIFY_URL from one background thread: a plain-text POST with a `Title`
    header (ntfy, Gotify-style receivers show both as they are), or through apprise for its URLs.
    At most one notice per user and event a minute: a second one within the minute is held and
    folded into one notice when the minute is over, never dropped (a harmless change followed by a
    promotion must not hide the promotion). A receiver that is down, slow or redirecting is logged
    once a minute and never delays or fails a sign-in (`notify` only appends to a queue)."""

    def __init__(self, url, *, timeout=NOTIFY_TIMEOUT_SECONDS, send=None, clock=time.time):
        self.url = url
        self.timeout = timeout
        self.clock = clock
        self._send = send or self._post
        self._queue = collections.deque(maxlen=1000)  # a flood of events drops the oldest notices
        self._held = {}  # (user, event) -> [when it may go, [(title, body), ...]]
        self._last = {}  # (user, event) -> when its last notice went
        self._wake = threading.Condition()
        self._busy = False
        self._thread = None
        self._failures = Throttle()

    def notify(self, user, event, title, body, now):
        if not self.url:
            return
        key = (user, event)
        with self._wake:
            last = self._last.get(key)
            if key in self._held or (last is not None and 0 <= now - last < NOTIFY_EVERY_SECONDS):
                held = self._held.setdefault(key, [last + NOTIFY_EVERY_SECONDS if last is not None else now, []])
                if len(held[1]) < MAX_HELD_NOTICES:
                    held[1].append((title, body))
            else:
                self._remember_sent(key, now)
                self._queue.append((title, body))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="notices", daemon=True)
                self._thread.start()
            self._wake.notify()

    def _remember_sent(self, key, now):
        if len(self._last) >= 10_000:
            self._last.clear()  # a stranger's many keys: at worst a notice goes out early
        self._last[key] = now

    def _release_held(self, now):
        """Queue every held notice whose minute is over, folded into one per user and event."""
        for key in [key for key, (due, _) in self._held.items() if due <= now]:
            _, notices = self._held.pop(key)
            self._remember_sent(key, now)
            title, body = notices[-1]
            if len(notices) > 1:
                title = f"{title} ({len(notices)} times)"
                body = "\n".join(first for first, _, _ in (b.partition("\n") for _, b in notices)) + "\n" + \
                    body.partition("\n")[2]
            self._queue.append((title, body))

    def drain(self, timeout):
        """Wait up to `timeout` seconds for every notice that may go now to be sent (the CLI before it
        exits, a server stopping, tests)."""
        deadline = time.monotonic() + timeout
        with self._wake:
            self._wake.notify()
            while (self._queue or self._busy or any(due <= self.clock() for due, _ in self._held.values())) \
                    and time.monotonic() < deadline:
                self._wake.wait(0.05)
        return not self._queue

    def _run(self):
        while True:
            with self._wake:
                while True:
                    self._release_held(self.clock())
                    if self._queue:
                        break
                    self._busy = False
                    self._wake.notify_all()
                    # Held notices are looked at again each second (the clock may be a test's).
                    self._wake.wait(1.0 if self._held else None)
                title, body = self._queue.popleft()
                self._busy = True
            try:
                self._send(title, body)
            except Exception as error:  # noqa: BLE001 - whatever the receiver does, sign-ins go on
                if self._failures.due("send", time.time()):
                    # The reason only: the URL may carry the receiver's token.
                    log.warning("a notice could not be sent to NOTIFY_URL: %s", _reason(error))

    def _post(self, title, body):
        scheme = self.url.partition(":")[0].lower()
        if scheme not in DEFAULT_PORTS:
            return self._apprise(title, body)
        import urllib.request  # here: the serving process carries it only once it has a notice to send

        url, credentials = _without_credentials(self.url)
        headers = {"Title": _header_text(title), "Content-Type": "text/plain; charset=utf-8"}
        if credentials:
            headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode("utf-8")).decode()
        request = urllib.request.Request(url, data=body.encode("utf-8"), method="POST", headers=headers)
        with _opener_without_redirects().open(request, timeout=self.timeout) as answer:
            answer.read(1024)
            if not 200 <= answer.status < 300:
                raise RuntimeError(f"the receiver answered {answer.status}")

    def _apprise(self, title, body):
        import apprise  # optional: NOTIFY_URL accepted a non-http URL only with it installed

        sender = apprise.Apprise()
        sender.add(self.url)
        # TEXT: mail (HTML) and chat (Markdown) receivers escape it, so a user agent chosen by whoever
        # signs in never arrives as a link in the admins' inbox.
        if not sender.notify(title=title, body=body, body_format=apprise.NotifyFormat.TEXT):
            raise RuntimeError("apprise could not deliver it")


def _without_credentials(url):
    """(the URL without user:password@, "user:password" or ''): urllib does not send userinfo, and
    would hand it to the resolver as part of the host name."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, ""
    userinfo, _, host = parts.netloc.rpartition("@")
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), urllib.parse.unquote(userinfo)


@functools.cache
def _opener_without_redirects():
    """urllib would follow a 301 to the notice's POST with a GET without it, and count its 200 as
    sent: here a 3xx stays an HTTPError, and is logged."""
    import urllib.request

    class Refuse(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    return urllib.request.build_opener(Refuse)


def _reason(error):
    """What went wrong sending a notice, without the URL (urllib puts it in some messages)."""
    if type(error) is RuntimeError:
        return str(error)  # ours: never the URL
    reason = getattr(error, "reason", None) or getattr(error, "code", None) or error.__class__.__name__
    return f"{error.__class__.__name__} ({reason})" if not isinstance(reason, str) or "://" not in reason else \
        error.__class__.__name__


def _header_text(text):
    """A header value: ASCII as it is, else RFC 2047 UTF-8 (ntfy decodes it), never a line break."""
    text = " ".join(text.split())
    if text.isascii():
        return text
    return "=?UTF-8?B?" + base64.b64encode(text.encode("utf-8")).decode() + "?="


class Journal:
    """The history and the notices: one record() per thing that happened. Writing the history never
    fails what happened (a busy database loses the line and logs it)."""

    def __init__(self, store, notifier, app_name):
        self.store = store
        self.notifier = notifier
        self.app_name = app_name

    def record(self, event, user, now, *, actor=None, ip="", agent="", device="", detail="", notify=None):
        entry = HistoryEntry(now, event, user, actor, ip, agent, device, detail)
        try:
            self.store.record(entry)
        except sqlite3.Error as error:
            log.warning("a history line (%s of %s) could not be written: %s", event, user or "-", error)
        if notify if notify is not None else EVENTS[event][1]:
            self.notifier.notify(user, event, *self.notice(entry), now)

    def notice(self, entry):
        """(title, body) of a notice: short enough for a lock screen; no secret is ever in an entry."""
        what = EVENTS[entry.event][0]
        who = entry.user or "someone"
        if entry.event == "sign-in" and entry.device == "new":
            what = "signed in from a new device"
        title = f"{self.app_name}: {who} {what}"
        by = "" if entry.actor is None else f" by {entry.actor or 'the command line'}"
        detail = f" ({entry.detail})" if entry.detail else ""
        line2 = " · ".join(part for part in (str(entry.ip), (entry.agent or "")[:60], format_time(entry.at)) if part)
        return shown(title), shown(f"{who} {what}{detail}{by}.") + "\n" + shown(line2)


# --- Household --------------------------------------------------------------
# The household's tasks, each once, for the command line and the admin page alike:
# the values checked, the change made, its history line and notice. A bad value is a
# UsageError (exit 2, a 400), a task that cannot be done a CommandError (exit 1, a page).

Invitation = collections.namedtuple("Invitation", "name token expires new")
NewToken = collections.namedtuple("NewToken", "name label token hosts expires notes")


def _checked_name(name, what="name"):
    if not isinstance(name, str) or not USER_NAME.fullmatch(name):
        raise UsageError(f"invalid {what} {shown(name)!r}: use 1-64 of A-Z a-z 0-9 . _ @ -",
                         say=f"bad_{what}", value=shown(name))
    return name


def _patterns(raw):
    """Validated, de-duplicated host patterns; `*` anywhere means every host."""
    patterns = []
    for text in raw:
        try:
            pattern = as_host_pattern(text)
        except ValueError as error:
            raise UsageError(str(error), say="bad_host_pattern", value=shown(text)) from None
        if pattern not in patterns:
            patterns.append(pattern)
    return (EVERY_HOST,) if EVERY_HOST in patterns else tuple(patterns)


def _pattern_list(text):
    """Host patterns as a form or --hosts gives them: separated by commas or whitespace."""
    return _patterns(text.replace(",", " ").split())


def _checked_full_name(text):
    if text is None or text == "":
        return text
    if len(text) > 100 or not text.isprintable() or text != text.strip():
        raise UsageError(f"--name {shown(text)!r}: use 1-100 printable characters, no spaces at either end",
                         say="bad_full_name")
    return text


def _checked_email(text):
    if text is None or text == "":
        return text
    local, at, domain = text.partition("@")
    if not (at and local and domain and "@" not in domain and len(text) <= 254 and text.isascii()
            and text.isprintable() and not any(c.isspace() for c in text)):
        raise UsageError(f"--email {shown(text)!r}: expected one address such as alice@example.com",
                         say="bad_email", value=shown(text))
    return text


MAX_GROUPS_CHARS = 1000  # Remote-Groups stays far below the 4-8 KB header buffers of nginx and Caddy


def _checked_groups(text):
    if text is None or text == "":
        return None if text is None else ()
    if len(text) > MAX_GROUPS_CHARS:
        raise UsageError(f"--groups: at most {MAX_GROUPS_CHARS} characters in all (proxies refuse longer headers)",
                         say="groups_too_long", n=MAX_GROUPS_CHARS)
    groups = [group.strip() for group in text.split(",")]
    for group in groups:
        _checked_name(group, "group")
    return tuple(dict.fromkeys(groups))


def _checked_identity(full_name=None, email=None, groups=None):
    return {"full_name": _checked_full_name(full_name), "email": _checked_email(email),
            "groups": _checked_groups(groups)}


ADMIN_SUFFIX = "/admin"  # the admin page: LOGIN_URL + this, routed with the login page


def is_admin_rule(settings, rule):
    """Whether a user (a User or the check path's Rule) is in ADMIN_GROUP; nobody is when it is empty."""
    groups = rule.groups if isinstance(rule.groups, str) else ""
    return bool(settings.admin_group) and settings.admin_group in groups.split(",")


def short_id(sid):
    """The session id as -sessions and the admin page show it, and -logout --session takes it."""
    return digest(sid)[:8]


class Household:
    """What a household does, the same from the command line and the admin page. `actor` says who
    (COMMAND_LINE, or the admin on the page); only the page is held to the last-admin rule, so
    that the person with the server can always repair it."""

    def __init__(self, settings, store, journal, clock=time.time):
        self.settings = settings
        self.store = store
        self.journal = journal
        self.clock = clock

    def require_user(self, name):
        user = self.store.user(_checked_name(name))
        if user is None:
            raise CommandError(f"no user named {name!r}", say="no_user", name=name)
        return user

    def invite(self, name, actor, *, hosts=None, full_name=None, email=None, groups=None, keep_tokens=False,
               new_only=False, reset_only=False):
        """A link for a new person (created pending) or a reset of a lost phone (their seed, sessions
        and, unless keep_tokens, app tokens end now); hosts and identity set with it. The page asks for
        one or the other (`new_only`, `reset_only`): inviting a name that exists must not reset them."""
        _checked_name(name)
        patterns = None if hosts is None else _pattern_list(hosts)
        if patterns == ():
            raise UsageError("--hosts: give at least one pattern (* for every host)", say="no_hosts")
        identity = _checked_identity(full_name, email, groups)
        existing = self.store.user(name)
        if existing is not None and new_only:
            raise CommandError(f"{name} is already here: to give them a new link, reset them on their page",
                               say="already_here", name=name)
        if existing is None and reset_only:
            raise CommandError(f"no user named {name!r}", say="no_user", name=name)
        if existing is not None and actor.name:
            self._refuse_on_self(existing, actor, "reset")
        token = secrets.token_urlsafe(32)
        now = self.clock()
        expires = int(now) + self.settings.invite_ttl
        with self._keeping_an_admin(actor) as keep_admin:
            new = self.store.create_invite(name, digest(token), new_seed(), now, expires,
                                           keep_tokens=bool(keep_tokens), hosts=patterns, identity=identity,
                                           keep_admin=keep_admin)
        self._record("invited" if new else "reset", name, actor, now, "app tokens kept" if keep_tokens and not new
                     else "")
        if patterns is not None:
            self._record("hosts", name, actor, now, _hosts_text(patterns))
        if any(value is not None for value in identity.values()):
            self._record("identity", name, actor, now, self._identity_detail(existing, identity))
        return Invitation(name, token, expires, new)

    def set_hosts(self, name, hosts, actor):
        patterns = _pattern_list(hosts) if isinstance(hosts, str) else _patterns(hosts)
        if not patterns:
            raise UsageError("give at least one host pattern (* for every host)", say="no_hosts")
        _checked_name(name)
        if not self.store.set_hosts(name, patterns):
            raise CommandError(f"no user named {name!r}", say="no_user", name=name)
        self._record("hosts", name, actor, self.clock(), _hosts_text(patterns))
        return patterns

    def set_identity(self, name, actor, full_name=None, email=None, groups=None):
        changes = _checked_identity(full_name, email, groups)
        if all(value is None for value in changes.values()):
            raise UsageError("give at least one of --name, --email, --groups")
        user = self.require_user(name)
        with self._keeping_an_admin(actor) as keep_admin:
            if not self.store.set_identity(name, **changes, keep_admin=keep_admin):
                raise CommandError(f"no user named {name!r}", say="no_user", name=name)
        self._record("identity", name, actor, self.clock(), self._identity_detail(user, changes))
        return self.store.user(name)

    def _identity_detail(self, before, changes):
        """What an identity change did, for the history and the notice: the fields, the new groups,
        and whether it made or unmade an admin (a promotion must not read like a typo fixed)."""
        parts = [label for label, field in (("name", "full_name"), ("email", "email")) if changes[field] is not None]
        if changes["groups"] is not None:
            parts.append(f"groups {','.join(changes['groups']) or '-'}")
            group = self.settings.admin_group
            was = before is not None and is_admin_rule(self.settings, before)
            if group and (group in changes["groups"]) != was:
                parts.append("now an admin" if not was else "no longer an admin")
        return ", ".join(parts)

    def end_sessions(self, name, actor):
        _checked_name(name)
        now = self.clock()
        if not self.store.end_sessions(name, now):
            raise CommandError(f"no user named {name!r}", say="no_user", name=name)
        self._record("sessions-ended", name, actor, now)

    def end_session(self, name, session, actor):
        """End one live session of NAME, named by its short id (or its whole id)."""
        self.require_user(name)
        now = self.clock()
        found = [s for s in self.store.live_sessions(name, now) if session in (short_id(s.sid), s.sid)]
        if not found:
            raise CommandError(f"{name} has no live session {session!r} (see -sessions {name})", say="no_session",
                               name=name)
        self.store.end_session(found[0].sid)
        self._record("session-ended", name, actor, now, f"session {short_id(found[0].sid)}")
        return found[0]

    def delete(self, name, actor):
        user = self.require_user(name)
        if actor.name:
            self._refuse_on_self(user, actor, "delete")
        now = self.clock()
        with self._keeping_an_admin(actor) as keep_admin:
            if not self.store.delete_user(name, now, keep_admin=keep_admin):
                raise CommandError(f"no user named {name!r}", say="no_user", name=name)
        self._record("deleted", name, actor, now)

    def create_token(self, name, label, actor, hosts=None, days=None):
        _checked_name(name)
        _checked_name(label, "label")
        patterns = _pattern_list(hosts) if hosts else (EVERY_HOST,)
        expires = None
        if days not in (None, ""):
            try:
                expires = int(self.clock()) + _as_int(days, 1, 3650) * 86400
            except ValueError as error:
                raise UsageError(f"--days: {error}", say="bad_days") from None
        user = self.require_user(name)
        notes = []
        user_patterns = _hosts_rule(user.hosts)
        if user_patterns is not None and patterns != (EVERY_HOST,):
            useless = [p for p in patterns if not any(patterns_overlap(p, u) for u in user_patterns)]
            if len(useless) == len(patterns):
                raise CommandError(f"{name} may open only {user.hosts}: a token for {','.join(patterns)} would open "
                                   "nothing (change their hosts first)", say="token_opens_nothing", name=name,
                                   hosts=user.hosts)
            if useless:
                notes.append(f"{name} may not open {','.join(useless)}; the token will not open it either")
        token = APP_TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        try:
            self.store.add_app_token(name, label, digest(token), patterns, now, expires)
        except RuntimeError as error:
            raise CommandError(str(error), say="token_label_taken", name=name, label=label) from None
        self._record("token-created", name, actor, now, f"label {label}, hosts {_hosts_text(patterns)}")
        return NewToken(name, label, token, patterns, expires, notes)

    def revoke_token(self, name, label, actor):
        if not self.store.delete_app_token(name, label):
            raise CommandError(f"{name!r} has no token labelled {label!r}", say="no_token", name=name, label=label)
        self._record("token-revoked", name, actor, self.clock(), f"label {label}")

    def _refuse_on_self(self, user, actor, what):
        if user.name == actor.name:
            raise CommandError(f"You cannot {what} yourself here: ask another admin, or use the command line",
                               say="not_yourself")

    @contextlib.contextmanager
    def _keeping_an_admin(self, actor):
        """The page never leaves ADMIN_GROUP without an enrolled member (the last admin taken out of
        it, or deleted): nobody could come back to the page. The store checks it in the change's own
        transaction. The command line is the repair kit and may."""
        try:
            yield self.settings.admin_group if actor.name else None
        except LastAdmin:
            raise CommandError(f"that would leave no admin ({self.settings.admin_group}): make someone else an "
                               "admin first (this is the last admin)", say="last_admin",
                               group=self.settings.admin_group) from None

    def _record(self, event, name, actor, now, detail=""):
        self.journal.record(event, name, now, actor=actor.name, ip=actor.ip, agent=actor.agent, detail=detail)



# --- Request ----------------------------------------------------------------
# The rules are pure functions over values (addresses, header values, URLs);
# `Request` reads the environ once and hands them the values. Nothing below
# this section touches the environ.


def parse_ip(text):
    """An ipaddress object (IPv4-mapped IPv6 unwrapped), or None; a port some proxies append is dropped."""
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [2001:db8::1]:443
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # 198.51.100.7:443
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class Trust:
    """Which peers' X-Forwarded-* headers are believed (TRUST_PROXY)."""

    def __init__(self, networks):
        self.networks = [ipaddress.ip_network(n) for n in networks]
        self._cache = {}

    def __contains__(self, address):
        if isinstance(address, str):
            cached = self._cache.get(address)
            if cached is None:
                ip = parse_ip(address)
                cached = ip is not None and self._covers(ip)
                if len(self._cache) < 1024:
                    self._cache[address] = cached
            return cached
        return self._covers(address)

    def _covers(self, ip):
        return any(ip.version == n.version and ip in n for n in self.networks)


def client_ip(peer, forwarded_for, trust):
    """The client's address: the peer, or from a trusted peer the right-most untrusted X-Forwarded-For hop.

    An ipaddress object; the peer's own text when it is not an address (a unix socket).
    """
    chosen = parse_ip(peer)
    if not forwarded_for or peer not in trust:
        return chosen or peer
    for hop in reversed(forwarded_for.split(",")):
        ip = parse_ip(hop)
        if ip is None:
            break  # a malformed hop: nothing left of it can be believed
        chosen = ip
        if ip not in trust:
            break
    return chosen


def limiter_key(ip):
    """IPv6 clients are grouped by /64, since one host usually holds a whole /64."""
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


UNSAFE_CHARACTER = re.compile(r"[^\x21-\x5b\x5d-\x7e]")  # controls, space, DEL, backslash, non-ASCII


def _has_unsafe_characters(text):
    return UNSAFE_CHARACTER.search(text) is not None


# Traefik forwards a WebSocket handshake with X-Forwarded-Proto ws or wss (traefik#6388):
# the same origin as http and https, as its own RedirectScheme reads them (traefik#9159).
WEBSOCKET_SCHEMES = {"ws": "http", "wss": "https"}


def request_origin(scheme, host):
    """(scheme, normalised host) the browser used; ValueError for a bad one."""
    scheme = scheme.strip().lower()
    scheme = WEBSOCKET_SCHEMES.get(scheme, scheme)
    if scheme not in DEFAULT_PORTS or "," in host or "@" in host:
        raise ValueError("bad forwarded scheme or host")
    normal = normalise_host(host.strip(), scheme)
    if normal is None:
        raise ValueError("bad forwarded host")
    return scheme, normal


def original_target(x_original_url, proto, host, uri, own_scheme, own_host):
    """(base, path, problem) of the URL the proxy was asked for, from a trusted proxy's headers.

    `base` is scheme://host[:port], `path` the path and query; each None when
    unusable, and `problem` says why (a malformed value is never echoed).
    X-Original-URL (nginx) and X-Forwarded-Host/-Uri/-Proto (Caddy, Traefik):
    each proxy passes a client's own header of the other family through, so
    when both are present they must agree on scheme, host and port (a missing
    X-Forwarded-Proto is the request's own scheme), or there is no original
    URL at all: never pick one of the two, and never let a client's header
    switch https to http and with it the default port.
    """
    forwarded = None
    if host is not None or uri is not None or proto is not None:
        forwarded = _forwarded_target(proto or own_scheme, host or own_host, uri)
    if x_original_url is None:
        return forwarded or (None, None, None)
    target = _nginx_target(x_original_url)
    if forwarded is not None and (forwarded[0] is None or forwarded[0] != target[0]):
        return None, None, None
    return target


def _forwarded_target(scheme, host, uri):
    try:
        scheme, netloc = request_origin(scheme, host)
    except ValueError as error:
        return None, None, str(error)
    base = f"{scheme}://{netloc}"
    uri = "/" if uri is None else uri
    if not uri.startswith("/") or uri.startswith("//") or _has_unsafe_characters(uri):
        return base, None, "bad forwarded URI"
    return base, uri, None


def _nginx_target(url):
    if _has_unsafe_characters(url):
        return None, None, "bad original URL"
    try:
        parts = urllib.parse.urlsplit(url)  # ValueError for a bad IPv6 literal
    except ValueError:
        return None, None, "bad original URL"
    host = normalise_host(parts.netloc, parts.scheme) if "@" not in parts.netloc else None
    if parts.scheme not in DEFAULT_PORTS or host is None or "," in parts.netloc:
        return None, None, "bad original URL"
    path = parts.path or "/"
    if path.startswith("//"):
        return f"{parts.scheme}://{host}", None, "bad original URL path"
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{host}", path + query, None


def url_host(url):
    """The normalised host[:port] of an absolute URL this module built."""
    return url.split("/", 3)[2]


def safe_next(value, login_host, settings):
    """`value` re-serialised if it is a safe place to return to after login, else "/"."""
    return judge_next(value, login_host, settings)[0]


def judge_next(value, login_host, settings):
    """(safe_next's answer, why `value` was refused or None): the reason goes to the log, never the value."""
    if not value:
        return "/", None
    if _has_unsafe_characters(value):
        return "/", "a backslash, whitespace or control character"
    if value.startswith("/"):
        if value[1:2] in ("/", "\\"):
            return "/", "a path that starts with // or /\\ (another host)"
        parts = urllib.parse.urlsplit(value)
        return urllib.parse.urlunsplit(("", "", parts.path, parts.query, parts.fragment)) or "/", None
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:
        return "/", "not a URL"
    allowed_schemes = ("https",) if settings.secure_cookies else ("https", "http")
    if parts.scheme not in allowed_schemes:
        return "/", f"not {' or '.join(allowed_schemes)} (SECURE_COOKIES=true allows https only)"
    if not parts.netloc or "@" in parts.netloc:
        return "/", "no host, or user info before it"
    host = normalise_host(parts.netloc, parts.scheme)
    if host is None or not redirect_allowed(parts.scheme, host, login_host, settings):
        return "/", (f"the host {host or '?'} is neither the login host, inside COOKIE_DOMAIN, nor in "
                     "ALLOWED_REDIRECT_HOSTS")
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path or "/", parts.query, parts.fragment)), None


def wants_html(method, accept, requested_with):
    """A browser navigation: GET/HEAD, Accept absent or with text/html, not XHR."""
    if method not in ("GET", "HEAD") or requested_with is not None:
        return False
    return accept is None or "text/html" in accept


def is_cross_site(sec_fetch_site, origin, own_origin):
    """A request another site made the browser send (Fetch Metadata, then Origin).

    `Origin: null` proves nothing (privacy modes send it): the CSRF token decides.
    An Origin that cannot be parsed is cross-site.
    """
    if (sec_fetch_site or "").lower() == "cross-site":
        return True
    if origin is None or origin == "null":
        return False
    try:
        parts = urllib.parse.urlsplit(origin)
        host = normalise_host(parts.netloc, parts.scheme)
    except ValueError:
        return True
    return own_origin is None or parts.scheme not in DEFAULT_PORTS or host != own_origin[1]


def is_same_origin(sec_fetch_site, origin, own_origin):
    """For the admin page's changes, stricter than is_cross_site: Fetch Metadata, when sent, says
    same-origin (a sibling subdomain is same-site, not same-origin), and an Origin, when sent, is
    exactly this scheme and host (`null` included: refused). A client that sends neither is no
    browser another site can drive; the session-bound CSRF token decides."""
    site = (sec_fetch_site or "").lower()
    if own_origin is None or (site and site != "same-origin"):
        return False
    if origin is None:
        return True
    try:
        parts = urllib.parse.urlsplit(origin)
        host = normalise_host(parts.netloc, parts.scheme)
    except ValueError:
        return False
    return own_origin is not None and (parts.scheme, host) == own_origin


def parse_cookies(header):
    """{name: [values]} for a Cookie header: a name sent twice keeps every value (a sibling
    subdomain can plant `auth_token=junk` beside the real one)."""
    cookies = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            cookies.setdefault(name, []).append(value.strip().strip('"'))
    return cookies


def parse_form(text):
    """{name: first value} of a query string or urlencoded body; HTTPError 400 if absurd."""
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise HTTPError(400, b"Too many fields\n", say="bad_request") from None
    form = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form


def presented_app_token(authorization):
    """(token, Basic user name or None) if the Authorization header carries a forward-auth app token.

    Only credentials with the `fat_` prefix are ours: an app's own `Bearer
    glsa_…` or `MediaBrowser …` is left to the app, and the cookie decides.
    """
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == "bearer" and value.startswith(APP_TOKEN_PREFIX):
        return value, None
    if scheme == "basic":
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        if sep and password.startswith(APP_TOKEN_PREFIX):
            return password, user
    return None


def _wsgi_text(raw):
    """WSGI hands us latin-1 decoded bytes; take them back as UTF-8 (U+FFFD for junk)."""
    return raw.encode("latin-1", "replace").decode("utf-8", "replace")


class computed_once:
    """A property worked out on first use and then kept in the instance.

    functools.cached_property would do, but in Python 3.11 it takes a lock on
    every first use, which the check path pays on each request.
    """

    def __init__(self, function):
        self.function = function
        self.name = function.__name__
        self.__doc__ = function.__doc__

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = instance.__dict__[self.name] = self.function(instance)
        return value


class Request:
    """The facts of one request, read once from the WSGI environ.

    What every request needs is read at once; what only some handlers need
    (client address, original URL, query, form) is worked out on first use
    and kept. `now` is the one clock reading of the request.
    """

    def __init__(self, environ, trust, now):
        self._environ = environ
        self._trust = trust
        self.now = now
        self.method = environ.get("REQUEST_METHOD", "GET")
        self.path = environ.get("PATH_INFO", "")
        self.peer = environ.get("REMOTE_ADDR", "")
        self.cookie_header = environ.get("HTTP_COOKIE", "")
        self.authorization = environ.get("HTTP_AUTHORIZATION")

    def _header(self, name):
        return self._environ.get(name)

    def _forwarded(self, name):
        """A proxy header, only from a trusted peer."""
        return self._environ.get(name) if self.trusted else None

    @computed_once
    def trusted(self):
        return self.peer in self._trust

    @computed_once
    def cookies(self):
        return parse_cookies(self.cookie_header)

    def cookie_values(self, name):
        return self.cookies.get(name, ())

    @computed_once
    def ip(self):
        return client_ip(self.peer, self._header("HTTP_X_FORWARDED_FOR"), self._trust)

    @computed_once
    def original_method(self):
        """The method the client used: X-Forwarded-Method from a trusted proxy, else this request's."""
        return (self._forwarded("HTTP_X_FORWARDED_METHOD") or self.method).upper()

    @property
    def reads_html(self):
        """A browser that will show an HTML answer, whatever the method (a form's POST too)."""
        return "text/html" in (self._header("HTTP_ACCEPT") or "")

    @computed_once
    def wants_html(self):
        return wants_html(self.original_method, self._header("HTTP_ACCEPT"), self._header("HTTP_X_REQUESTED_WITH"))

    @computed_once
    def origin(self):
        """(scheme, host) the browser used, from trusted X-Forwarded-* or the request itself; None if bad."""
        scheme = self._forwarded("HTTP_X_FORWARDED_PROTO") or self._environ.get("wsgi.url_scheme", "http")
        host = self._forwarded("HTTP_X_FORWARDED_HOST") or self.own_host
        try:
            return request_origin(scheme, host)
        except ValueError:
            return None

    @computed_once
    def own_host(self):
        return self._header("HTTP_HOST") or self._environ.get("SERVER_NAME", "")

    def target_mentions(self, text):
        """Whether `text` is in the original URL's raw headers at all: one cheap look before a precise one."""
        environ = self._environ
        return text in environ.get("HTTP_X_FORWARDED_URI", "") or text in environ.get("HTTP_X_ORIGINAL_URL", "")

    @computed_once
    def _original(self):
        """(base, path, problem) of the original URL: see original_target()."""
        if not self.trusted:
            return None, None, None
        return original_target(
            self._header("HTTP_X_ORIGINAL_URL"),
            self._header("HTTP_X_FORWARDED_PROTO"),
            self._header("HTTP_X_FORWARDED_HOST"),
            self._header("HTTP_X_FORWARDED_URI"),
            self._environ.get("wsgi.url_scheme", "http"),
            self.own_host,
        )

    @computed_once
    def original_url(self):
        """The whole original URL, or None when any part of it is unknown or unusable."""
        base, path, _ = self._original
        return base + path if base and path else None

    @property
    def original_base(self):
        """scheme://host[:port] of the original URL, or None: usable even when its path is not."""
        return self._original[0]

    @property
    def original_problem(self):
        return self._original[2]

    @computed_once
    def original_host(self):
        """(host name, port) of the original URL, or None when it is unknown (or its path unusable).
        Read from the base alone: a restricted user's every check asks, and the whole URL is not
        needed for it (both kinds of target give a path that starts with /)."""
        base, path, _ = self._original
        return host_and_port(base) if base and path else None

    @computed_once
    def query(self):
        return parse_form(self.query_string)

    @computed_once
    def query_string(self):
        return _wsgi_text(self._environ.get("QUERY_STRING", ""))

    @property
    def accept_language(self):
        return self._header("HTTP_ACCEPT_LANGUAGE") or ""

    @property
    def user_agent(self):
        return self._header("HTTP_USER_AGENT") or ""

    @property
    def origin_header(self):
        return self._header("HTTP_ORIGIN")

    @property
    def sec_fetch_site(self):
        return self._header("HTTP_SEC_FETCH_SITE")

    @property
    def has_form(self):
        content_type = (self._environ.get("CONTENT_TYPE") or "").split(";")[0].strip().lower()
        return content_type == "application/x-www-form-urlencoded"

    @computed_once
    def form(self):
        """The urlencoded body: 400 for a bad length, 413 over 8 KiB, 415 for another type."""
        try:
            length = int(self._environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise HTTPError(400, b"Bad Content-Length\n", say="bad_request") from None
        if length > MAX_FORM_BYTES:
            raise HTTPError(413, b"Form too large\n", say="bad_request")
        if not self.has_form:
            raise HTTPError(415, b"Expected application/x-www-form-urlencoded\n", say="bad_request")
        body = self._environ["wsgi.input"].read(length) if length > 0 else b""
        return parse_form(body.decode("utf-8", "replace"))


# --- Languages --------------------------------------------------------------
# The words of every page a person sees, in the visitor's language. English is
# here (the module alone still runs); every other language is one JSON file in
# languages/ beside this module, read once at start. Which one a page is in comes
# from the visitor's own pick (the `lang` cookie) or Accept-Language, and is always
# one of the files' own tags: what the browser sent is never echoed (Authelia's
# language cookie reached its HTML unfiltered: GHSA-gmfg-3v4q-9qr4).

# languages/ beside this module (a checkout, the container); pip installs it under the prefix.
LANGUAGES_DIRS = (os.path.join(os.path.dirname(os.path.abspath(__file__)), "languages"),
                  os.path.join(sys.prefix, "share", "forward-auth", "languages"))
LANGUAGE_COOKIE = "lang"
LANGUAGE_COOKIE_SECONDS = 365 * 86400
LANGUAGE_FILE = re.compile(r"([A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*)\.json")  # RFC 5646's shape: de, pt-BR
MAX_LANGUAGE_RANGES = 32  # Accept-Language entries judged; more is no browser's
QVALUE = re.compile(r"0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?")  # RFC 9110 §12.4.2
PAGE_VARY = ("Vary", "Accept-Language, Cookie")  # RFC 9110 §12.5.5: a page differs by both

# English, the one language every other falls back to, key by key. A list is a
# counted phrase: its forms in the order the language's plural rule numbers them.
ENGLISH_PLURAL = "nplurals=2; plural=(n != 1);"
ENGLISH = {
    # Shared
    "sign_in": "Sign in",
    "signed_in_as": "Signed in as {name}",
    "code_label": "Code from your authenticator app",
    "language": "Language",
    "back_to_sign_in": "Back to sign-in",
    "minutes": ["{n} minute", "{n} minutes"],
    # The login page
    "title_sign_in": "Sign in · {app_name}",
    "to_continue_to": "to continue to {host}",
    "signing_in_as": "Signing in as {name}",
    "not_name": "Not {name}?",
    "wrong_code": "Wrong code. Try again.",
    "wrong_code_for": "Wrong code for {name}. Not {name}? Use the link below the button.",
    "code_used": "That code was just used. Wait for the next one.",
    "too_many": ["Too many attempts. Try again in {n} minute.", "Too many attempts. Try again in {n} minutes."],
    "unavailable": "Signing in is unavailable for a moment. Please try again.",
    "form_expired": "This form expired. Please enter the code again.",
    "plain_http_refused": "This browser could not keep the sign-in: the page came over plain HTTP, and it needs "
                          "HTTPS here (see below).",
    "plain_http_note": "This page came over plain HTTP but SECURE_COOKIES=true: the browser will not keep the "
                       "sign-in. Serve it over HTTPS, or set SECURE_COOKIES=false to try it on plain HTTP.",
    # Signed in, and refused
    "sign_out": "Sign out",
    "sign_out_everywhere": "Sign out everywhere",
    "everywhere_hint": "Everywhere: every browser and device signed in as {user}.",
    "manage_household": "Manage the household",
    "not_allowed": "Not allowed",
    "title_not_allowed": "Not allowed · {app_name}",
    "may_not_open": "Signed in as {name}, who may not open {host}.",
    "this_address": "this address",
    "sign_in_as_someone_else": "Sign in as someone else",
    # Invitations
    "title_set_up": "Set up · {app_name}",
    "title_link_expired": "Link expired · {app_name}",
    "set_up_heading": "Set up your authenticator for {app_name}",
    "invite_adds": "This link sets up the sign-in of {name}. Have your authenticator app ready (Google Authenticator, Aegis, "
                   "1Password…), then continue.",
    "show_setup_code": "Show my setup code",
    "invite_expires": "It works once, and expires {when}.",
    "replaces_old_entry": "This link replaces your old entry for {app_name} in the authenticator app: its codes "
                          "no longer work. Delete it once the new one is set up.",
    "scan_this": "Scan this with your authenticator app, or {link} on this phone.",
    "open_in_app": "open it in the app",
    "or_type_key": "Or type this key:",
    "new_code_label": "The code your app now shows for {app_name}",
    "finish": "Finish and sign in",
    "link_gone": "This link no longer works",
    "link_gone_text": "An invitation works once and expires. Ask whoever sent it for a new link.",
    "link_elsewhere": "This link was opened on another device",
    "link_elsewhere_text": "An invitation shows its setup code to one browser only. Ask whoever sent it for a new "
                           "link.",
    # Moments: "in 3 days, on Tuesday 1 December at 13:00 UTC"
    "moment": "{when}, on {date}",
    "date": "{weekday} {day} {month} at {time} UTC",
    "in_days": ["in {n} day", "in {n} days"],
    "in_hours": ["in {n} hour", "in {n} hours"],
    "in_minutes": ["in {n} minute", "in {n} minutes"],
    "weekdays": "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "months": "January February March April May June July August September October November December",
    # Error pages
    "error": "Something went wrong",
    "not_found": "There is nothing at this address.",
    "method_not_allowed": "This address does not take that request.",
    "cross_site": "Refused: the form came from another site.",
    "bad_request": "This request could not be read. Open the page again.",
    "bad_forwarded": "The proxy in front of this page sent an address that cannot be used.",
    "admin_form_expired": "This form expired: open the admin page again.",
    "logout_form_expired": "This form expired: sign out again.",
    "no_such_user": "No such user.",
    "database_unavailable": "Unavailable for a moment. Please try again.",
    "internal_error": "Something went wrong here. Please try again.",
    # The admin page
    "nav_people": "People",
    "nav_history": "History",
    "nav_your_sign_in": "Your sign-in",
    "title_fresh_code": "Fresh code · {app_name}",
    "fresh_code_label": "A fresh code from your authenticator app",
    "continue": "Continue",
    "fresh_code_hint": "The admin page asks for a code at most {minutes} old. The code you signed in with works "
                       "once: wait for the next one.",
    "fresh_code_first": "Not done: type a fresh code first, then do it again.",
    "not_an_admin": "Not an admin",
    "title_not_an_admin": "Not an admin · {app_name}",
    "not_in_group": "Signed in as {name}, who is not in the group {group} that manages {app_name}.",
    "no_admin_group": "(none: ADMIN_GROUP is empty)",
    "back": "Back",
    "title_household": "Household",
    "invite_someone": "Invite someone",
    "user_name_label": "User name (what they are called at sign-in)",
    "more_fields": "Name, email, groups, apps",
    "full_name": "Full name",
    "email": "Email",
    "groups_label": "Groups (comma-separated)",
    "may_open_label": "May open (host patterns; empty: every app)",
    "create_invitation": "Create an invitation link",
    "nobody_yet": "Nobody yet.",
    "last_sign_in": "last sign-in {time}",
    "invitation_expired": "invitation expired: reset them for a new link",
    "invited": "invited; the link expires {expires}",
    "invited_opened": "invited, opened {opened}; the link expires {expires}",
    "groups_detail": "groups {groups}",
    "may_open_detail": "may open {hosts}",
    "never": "never",
    "who_they_are": "Who they are",
    "groups_admin_label": "Groups (comma-separated; {admin_group} may manage the household)",
    "save": "Save",
    "what_they_may_open": "What they may open",
    "host_patterns_label": "Host patterns (* for every app)",
    "signed_in_heading": "Signed in",
    "sign_user_out_everywhere": "Sign {name} out everywhere",
    "no_live_session": "No live session.",
    "session_row": "signed in {login} · last seen {seen}",
    "this_browser": "this browser",
    "end_this_session": "End this session",
    "app_tokens": "App tokens",
    "no_app_token": "No app token.",
    "token_row": "created {created} · expires {expires} · last used {used}",
    "token_hosts": "hosts {hosts}",
    "revoke": "Revoke",
    "new_app_token": "New app token (for a script, a calendar or a monitor)",
    "label": "Label",
    "token_hosts_label": "Hosts (empty: all {name} may open)",
    "days_label": "Expires after days (empty: never)",
    "create_token": "Create the token",
    "lost_phone": "Lost phone",
    "lost_phone_text": "A new invitation link: their authenticator and every session stop working now.",
    "keep_tokens": "Keep their app tokens",
    "reset_user": "Reset {name}",
    "delete": "Delete",
    "delete_label": "Type {name} to delete them, their sessions and tokens",
    "delete_user": "Delete {name}",
    "history_of": "History of {name}",
    "title_history": "History",
    "history_everyone": "everyone",
    "history_of_user": "of {name}",
    "history_kept": ["Kept {n} day. Newest first.", "Kept {n} days. Newest first."],
    "history_limit": ["Only the last {n} is shown here (-history shows all).",
                      "Only the last {n} are shown here (-history shows all)."],
    "nothing_yet": "Nothing yet.",
    "nobody": "nobody",
    "by": "by {name}",
    "by_command_line": "by the command line",
    "known_device": "known device",
    "new_device": "new device",
    "title_invitation": "Invitation for {name}",
    "send_link": "Send this link to {name} directly (a message to them, not a group). It works once, on the first "
                 "browser that opens it, and expires {expires}.",
    "invitation_link": "Invitation link",
    "shown_once_link": "Shown only now: this page does not come back. A new link voids this one.",
    "done": "Done",
    "title_token": "App token for {name}",
    "token_text": "Label {label}, hosts {hosts}, expires {expires}. Put it where the script or app reads it (as a "
                  "password with the user name {name}, or as a Bearer token).",
    "shown_once": "Shown only now: this page does not come back.",
    "already_shown": "Already shown",
    "already_shown_text": "A new link or token is shown once. Make a new one if it was not copied.",
    "done_identity": "Saved: the apps see it within a second.",
    "done_hosts": "Saved: takes effect within a second.",
    "done_end_sessions": "Every session ended.",
    "done_end_session": "That session ended.",
    "done_revoke_token": "Token revoked.",
    "done_delete": "Deleted.",
    # What the admin page says when a change cannot be made
    "bad_name": "Not done: {value} cannot be a user name. Use 1 to 64 of A-Z a-z 0-9 . _ @ -",
    "bad_group": "Not done: {value} cannot be a group name. Use 1 to 64 of A-Z a-z 0-9 . _ @ -",
    "bad_label": "Not done: {value} cannot be a label. Use 1 to 64 of A-Z a-z 0-9 . _ @ -",
    "bad_full_name": "Not done: a full name is 1 to 100 printable characters, with no spaces at either end.",
    "bad_email": "Not done: {value} is not an email address such as alice@example.com.",
    "groups_too_long": "Not done: the groups are longer than {n} characters in all.",
    "bad_host_pattern": "Not done: {value} is not a host pattern. Use a host (jellyfin.example.com), *.domain, or * "
                        "for every app.",
    "no_hosts": "Not done: give at least one host pattern (* for every app).",
    "already_here": "{name} is already here: to give them a new link, reset them on their page.",
    "no_user": "There is no user named {name}.",
    "no_session": "{name} has no live session like that: it has ended already.",
    "bad_days": "Not done: the days are a whole number from 1 to 3650.",
    "token_opens_nothing": "Not done: {name} may open only {hosts}, so this token would open nothing. Change their "
                           "hosts first.",
    "token_label_taken": "Not done: {name} already has a token labelled {label}.",
    "no_token": "{name} has no token labelled {label}.",
    "not_yourself": "You cannot do that to yourself here: ask another admin, or use the command line.",
    "last_admin": "Not done: that would leave no admin in {group}, as this is the last admin. Make someone else "
                  "an admin first.",
    "type_name_to_delete": "Not deleted: type {name} exactly to delete them.",
    "unknown_action": "Unknown action.",
    # The history's events, as the admin page lists them
    **{f"event:{name}": text for name, (text, _) in EVENTS.items()},
}
# Keys whose value is a list of words separated by spaces, not a phrase: their counts must match.
WORD_LISTS = {"weekdays": 7, "months": 12}


def placeholders(text):
    """The names a text fills in: {name} and {n} -> {"name", "n"}; None if it is no valid template, or
    fills in more than plain names: a conversion or a format spec ({n:>20000000}) would make a page fail
    or grow to megabytes (red team, issue 27)."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError:
        return None
    names = set()
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if spec or conversion or not field.isidentifier():
            return None
        names.add(field)
    return names


def english_plural(n):
    return int(n != 1)  # ENGLISH_PLURAL


class Catalogue:
    """One language's texts, English where a key is missing or unusable. `say` fills in values
    (plain text: fragment() escapes it), `count` picks the plural form for a number."""

    def __init__(self, tag, name, texts, plural=None, direction="ltr", english=None):
        """`plural`: the rule n -> form index (plural_rule's), English's if None."""
        self.tag, self.name, self.direction = tag, name, direction
        self.english = english or self
        self.texts = texts
        self._plural = plural or english_plural

    def text(self, key):
        """The raw text of `key`, placeholders unfilled."""
        return self.texts.get(key) or self.english.texts[key]

    def say(self, key, **values):
        return self.text(key).format(**values)

    def count(self, key, n, **values):
        forms = self.texts.get(key)
        try:
            index = self._plural(n) if forms else -1
        except ArithmeticError:  # a rule proven at start only for n below 200 (n/(n-1000))
            index = -1
        if not forms or not 0 <= index < len(forms):
            forms, index = self.english.texts[key], self.english._plural(n)
        return forms[index].format(n=n, **values)

    def words(self, key):
        return self.say(key).split()


ENGLISH_WORDS = Catalogue("en", "English", ENGLISH)  # also the command line's


def plural_rule(header):
    """(the function n -> form index, nplurals) of a gettext Plural-Forms header ("nplurals=3; plural=(n==1
    ? 0 : ...);"), as translators know it; gettext's own parser, which admits only C's arithmetic.
    ValueError for anything else."""
    import gettext  # only at start, where the catalogues are read

    match = re.fullmatch(r"\s*nplurals\s*=\s*([1-6])\s*;\s*plural\s*=\s*(.+?)\s*;?\s*",
                         header if isinstance(header, str) else "")
    if match is None:
        raise ValueError("expected nplurals=N; plural=EXPRESSION;")
    rule, count = gettext.c2py(match.group(2)), int(match.group(1))
    try:  # the numbers pages count (more are judged as they come: Catalogue.count)
        if any(not 0 <= rule(n) < count for n in range(200)):
            raise ValueError(f"the plural rule gives a form past nplurals={count}")
    except ArithmeticError:
        raise ValueError("the plural rule divides by zero") from None
    return rule, count


def read_catalogue(path, tag, english):
    """The Catalogue in one JSON file; a key with other placeholders than English's, or of another
    kind, is left out (English shows there) and logged. ValueError for a file that is not one."""
    with open(path, encoding="utf-8") as file:
        data = json.load(file)
    if not isinstance(data, dict) or not isinstance(data.get("texts"), dict) or not isinstance(
            data.get("language"), str):
        raise ValueError('expected {"language": "its own name", "plural_forms": "...", "texts": {...}}')  # noqa: TRY004
    plural = data.get("plural_forms", ENGLISH_PLURAL)
    rule, count = plural_rule(plural)
    texts, unusable = {}, []
    for key, value in data["texts"].items():
        if usable_translation(key, value, count):
            texts[key] = value
        elif key in ENGLISH:
            unusable.append(key)
    if unusable:
        log.warning("language %s: English for %s (other placeholders or forms than English's)", tag,
                    ", ".join(sorted(unusable)[:10]))
    direction = "rtl" if data.get("direction") == "rtl" else "ltr"
    return Catalogue(tag, data["language"][:40], texts, rule, direction, english)


def usable_translation(key, value, plural_count):
    english = ENGLISH.get(key)
    if isinstance(english, list):
        return (isinstance(value, list) and len(value) == plural_count
                and all(isinstance(form, str) and placeholders(form) == placeholders(english[-1]) for form in value))
    if key in WORD_LISTS:  # words filled into a date as they are: no braces
        return isinstance(value, str) and len(value.split()) == WORD_LISTS[key] and not {"{", "}"} & set(value)
    return isinstance(english, str) and isinstance(value, str) and placeholders(value) == placeholders(english)


class Languages:
    """The shipped catalogues, English first, and the choice of one for a request."""

    def __init__(self, catalogues):
        self.english = catalogues[0]
        self.by_tag = {catalogue.tag.lower(): catalogue for catalogue in catalogues}

    @classmethod
    def load(cls, folder=None):
        """English and every readable languages/TAG.json (in the first of LANGUAGES_DIRS there is, or
        `folder`); a file that cannot be read is one log line."""
        english = ENGLISH_WORDS
        catalogues = [english]
        folder = folder or next((path for path in LANGUAGES_DIRS if os.path.isdir(path)), LANGUAGES_DIRS[0])
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            names = []  # no folder: English alone
        for name in names:
            match = LANGUAGE_FILE.fullmatch(name)
            if match is None or match.group(1).lower() == "en":
                continue
            try:
                catalogues.append(read_catalogue(os.path.join(folder, name), match.group(1), english))
            except Exception as error:  # noqa: BLE001 - no file may stop the start (JSON nested 100,000 deep, n/0)
                log.warning("language file %s not used: %s", name, str(error)[:200] or type(error).__name__)
        return cls(catalogues)

    def __iter__(self):
        return iter(self.by_tag.values())

    def shipped(self, value):
        """The catalogue whose tag `value` is (any case), or None."""
        return self.by_tag.get(value.lower()) if isinstance(value, str) else None

    def choose(self, request):
        """A `lang` in the query (the picker's link), else the `lang` cookie, else Accept-Language."""
        picked = self.picked(request)
        if picked is not None:
            return picked
        for value in request.cookie_values(LANGUAGE_COOKIE):
            if (catalogue := self.shipped(value)) is not None:
                return catalogue
        return self.negotiate(request.accept_language)

    def picked(self, request):
        """The language a picker link asked for (?lang=), if it is shipped."""
        try:
            return self.shipped(request.query.get(LANGUAGE_COOKIE))
        except HTTPError:  # a query that cannot be read picks nothing
            return None

    def negotiate(self, header):
        """RFC 9110 §12.5.4 with RFC 4647 §3.4's lookup: the ranges best first, each tried as it is
        and then with its last subtag cut (de-AT -> de); `*`, or no range shipped, is English."""
        refused = set()
        for tag in accepted_languages(header or "", refused):
            if tag == "*":
                break
            while tag:
                if tag not in refused and tag in self.by_tag:
                    return self.by_tag[tag]
                tag = tag.rpartition("-")[0]
                if len(tag) > 1 and tag[-2] == "-":  # a singleton ("x" of de-x-...) goes with what follows
                    tag = tag[:-2]
        return self.english


def accepted_languages(header, refused):
    """An Accept-Language value's ranges, lowercased, highest q first (ties in the order given); those
    with q=0 ("not acceptable", RFC 9110 §12.4.2) go to `refused`; a malformed entry counts as absent."""
    ranked = []
    for position, item in enumerate(header.split(",")[:MAX_LANGUAGE_RANGES]):
        tag, *parameters = (part.strip() for part in item.split(";", 4)[:4])
        tag, quality = tag.lower(), 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                quality = float(value) if QVALUE.fullmatch(value.strip()) else -1.0
        if not re.fullmatch(r"\*|[a-z]{1,8}(-[a-z0-9]{1,8})*", tag) or quality < 0:
            continue
        if quality == 0:
            refused.add(tag)
        else:
            ranked.append((-quality, position, tag))
    return [tag for _, _, tag in sorted(ranked)]


# --- Pages ------------------------------------------------------------------
# Inline HTML, no script. One style sheet, allowed by its hash in the CSP.

PAGE_CSS = """
:root{color-scheme:light dark;--bg:#f4f5f7;--card:#fff;--fg:#1d2330;--muted:#5b6475;
--line:#c9ced8;--accent:#2451c7;--accent-fg:#fff;--error:#b3261e;--error-bg:#fdecea}
@media (prefers-color-scheme:dark){:root{--bg:#111318;--card:#1c1f26;--fg:#e6e8ee;
--muted:#a2a9b8;--line:#3a404c;--accent:#7aa2ff;--accent-fg:#0b1020;--error:#ffb4ab;--error-bg:#3b1614}}
*{box-sizing:border-box}
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;
background:var(--bg);color:var(--fg);font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{width:100%;max-width:24rem;margin:1rem;padding:2rem 1.5rem;background:var(--card);
border:1px solid var(--line);border-radius:12px;box-shadow:0 8px 24px rgba(0,0,0,.08)}
h1{font-size:1.35rem;margin:0 0 1.25rem;text-align:center}
.sub{color:var(--muted);margin:-1rem 0 1.25rem;text-align:center;overflow-wrap:anywhere}
label{display:block;font-weight:600;margin-bottom:.5rem}
input[name=otp]{width:100%;padding:.7rem;font-size:1.6rem;letter-spacing:.4em;text-align:center;
font-variant-numeric:tabular-nums;border:1px solid var(--line);border-radius:8px;
background:transparent;color:inherit}
input[name=otp]:focus{outline:3px solid var(--accent);outline-offset:1px}
button{width:100%;margin-top:1rem;padding:.75rem;font-size:1rem;font-weight:600;border:0;
border-radius:8px;background:var(--accent);color:var(--accent-fg);cursor:pointer}
button.quiet{background:transparent;color:var(--accent);border:1px solid var(--line);margin-top:.75rem}
button.link{width:auto;margin:0;padding:.25rem;font-weight:400;font-size:inherit;background:none;color:var(--accent);
text-decoration:underline}
nav.langs{margin:1.5rem 0 0;font-size:.8rem;color:var(--muted);gap:.25rem .75rem}
a{color:var(--accent)}
.message{margin:0 0 1rem;padding:.6rem .8rem;border-radius:8px;background:var(--error-bg);color:var(--error)}
.hint{color:var(--muted);font-size:.875rem;margin:.75rem 0 0;text-align:center}
.qr{display:flex;justify-content:center;margin:0 0 1rem}
.qr svg{background:#fff;border-radius:8px;width:min(100%,14rem);height:auto}
.secret{font:1.05rem/1.6 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;text-align:center;
word-spacing:.3em;overflow-wrap:anywhere;user-select:all;margin:0 0 1rem}
.note{color:var(--muted);font-size:.875rem;margin:0 0 1rem;padding:.5rem .75rem;border-left:3px solid var(--line)}
main.wide{max-width:46rem;padding:1.5rem 1.25rem}
nav{display:flex;flex-wrap:wrap;gap:.25rem 1.25rem;justify-content:center;margin:-.5rem 0 1.25rem}
h2{font-size:1.05rem;margin:1.75rem 0 .6rem;padding-top:1rem;border-top:1px solid var(--line)}
input.field{width:100%;padding:.55rem .65rem;margin:0 0 .75rem;font:inherit;border:1px solid var(--line);
border-radius:8px;background:transparent;color:inherit}
label.check{font-weight:400;display:flex;gap:.5rem;align-items:center}
.row{display:block;border:1px solid var(--line);border-radius:8px;padding:.6rem .8rem;margin:0 0 .5rem;
overflow-wrap:anywhere;color:inherit;text-decoration:none}
a.row:hover{border-color:var(--accent)}
.row form{margin:.4rem 0 0}
.muted{color:var(--muted);font-size:.875rem}
.done{margin:0 0 1rem;padding:.6rem .8rem;border-radius:8px;border:1px solid var(--accent)}
details{margin:0 0 .75rem}summary{cursor:pointer;font-weight:600;margin:0 0 .6rem}
button.small{width:auto;margin:0;padding:.35rem .8rem;font-size:.875rem}
button.danger{background:var(--error);color:var(--card)}
a.button{display:block;margin:1rem 0 0;padding:.75rem;border-radius:8px;text-align:center;font-weight:600;
text-decoration:none;background:var(--accent);color:var(--accent-fg)}
.center{text-align:center}
input.link{width:100%;padding:.55rem;font:.9rem ui-monospace,Menlo,Consolas,monospace;border:1px solid var(--line);
border-radius:8px;background:transparent;color:inherit;margin:0 0 1rem}
@keyframes rise{from{opacity:0;transform:translateY(.5rem)}to{opacity:1;transform:none}}
@media (prefers-reduced-motion:no-preference){main{animation:rise .3s ease-out}}
"""
PAGE_CSS_HASH = base64.b64encode(hashlib.sha256(PAGE_CSS.encode()).digest()).decode()

PAGE = """<!doctype html>
<html lang="{lang}"{dir}>
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>{css}</style>
</head>
<body>
<main{wide}>
{body}{picker}</main>
</body>
</html>
"""

LOGIN_FORM = """<h1>{app_name}</h1>
{subtitle}{message}{note}<form method="post">
<label for="otp">{t[code_label]}</label>
{otp_input}
<input type="hidden" name="next" value="{next}">
<input type="hidden" name="csrf" value="{csrf}">
<button type="submit"{disabled}>{t[sign_in]}</button>
</form>
{forget}"""

# "Not NAME?" throws the device away: a quiet link under the form, not a second big
# button one slip of the thumb from "Sign in". Still a POST with the CSRF token.
FORGET_DEVICE = """<form method="post" class="hint">
<input type="hidden" name="action" value="forget">
<input type="hidden" name="next" value="{next}">
<input type="hidden" name="csrf" value="{csrf}">
<button type="submit" class="link">{t[not_name]}</button>
</form>
"""

SIGNED_IN = """<h1>{app_name}</h1>
<p class="sub">{t[signed_in_as]}</p>
{admin}
<form method="post" action="{logout}">
<input type="hidden" name="csrf" value="{csrf}">
<button type="submit">{t[sign_out]}</button>
</form>
<form method="post" action="{logout}">
<input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="all" value="1">
<button type="submit" class="quiet">{t[sign_out_everywhere]}</button>
</form>
<p class="hint">{t[everywhere_hint]}</p>
"""

ADMIN_LINK = """<p class="center"><a class="button" href="{admin}">{t[manage_household]}</a></p>
"""

FORBIDDEN_PAGE = """<h1>{t[not_allowed]}</h1>
<p>{t[may_not_open]}</p>
<p class="hint"><a href="{logout}">{t[sign_in_as_someone_else]}</a></p>
"""

INVITE_START = """<h1>{t[set_up_heading]}</h1>
<p>{t[invite_adds]}</p>
{replaces}
<form method="post">
<input type="hidden" name="invite" value="{invite}">
<input type="hidden" name="csrf" value="{csrf}">
<button type="submit">{t[show_setup_code]}</button>
</form>
<p class="hint">{t[invite_expires]}</p>
"""

INVITE_SETUP = """<h1>{t[set_up_heading]}</h1>
{message}{replaces}<p>{t[scan_this]}</p>
<div class="qr">{qr}</div>
<p class="hint">{t[or_type_key]}</p>
<p class="secret">{secret}</p>
<form method="post">
<label for="otp">{t[new_code_label]}</label>
{otp_input}
<input type="hidden" name="invite" value="{invite}">
<input type="hidden" name="csrf" value="{csrf}">
<button type="submit"{disabled}>{t[finish]}</button>
</form>
"""

APP_LINK = '<a href="{uri}">{t[open_in_app]}</a>'
REPLACES_NOTE = '<p class="note">{t[replaces_old_entry]}</p>\n'

INVITE_GONE = """<h1>{t[link_gone]}</h1>
<p>{t[link_gone_text]}</p>
"""

INVITE_ELSEWHERE = """<h1>{t[link_elsewhere]}</h1>
<p>{t[link_elsewhere_text]}</p>
"""

ERROR_PAGE = """<h1>{t[error]}</h1>
<p>{text}</p>
<p class="hint"><a href="{login}">{t[back_to_sign_in]}</a></p>
"""

# The one code field. One space or hyphen in the middle is allowed, as apps show
# codes ("332 123"); a pattern of six digits made browsers cut such a paste short.
OTP_INPUT = (
    '<input id="otp" name="otp" type="text" inputmode="numeric" pattern="[0-9]{3}[ \\-]?[0-9]{3}" minlength="6"\n'
    ' maxlength="7" autocomplete="one-time-code" placeholder="123 456" required'
)


def otp_input(autofocus=False, disabled=False):
    return Markup(OTP_INPUT + (" autofocus" if autofocus else "") + (" disabled" if disabled else "") + ">")


MESSAGE = '<p class="message" role="alert">{message}</p>\n'
PLAIN_HTTP_NOTE = '<p class="note">{t[plain_http_note]}</p>\n'
SUBTITLE = '<p class="sub">{text}</p>\n'
LANGUAGE_LINK = '<a href="?{query}" lang="{tag}" hreflang="{tag}">{name}</a>'
LANGUAGE_HERE = '<b lang="{tag}" aria-current="true">{name}</b>'
LANGUAGE_PICKER = '<nav class="langs" aria-label="{t[language]}">{links}</nav>\n'

# No form-action: Chromium applies it to the redirect after the POST, which
# would block returning to another host of a shared login (COOKIE_DOMAIN).
PAGE_CSP = (
    f"default-src 'none'; style-src 'sha256-{PAGE_CSS_HASH}'; img-src data:; "
    "base-uri 'none'; frame-ancestors 'none'"
)
# The allow answer carries no content, so no Content-Type (RFC 9110 §8.3): every
# response header costs waitress about 10,000 instructions, 3 % of a /verify.
EMPTY_BODY = [("Content-Length", "0")]
SECURITY_HEADERS = [
    ("Content-Security-Policy", PAGE_CSP),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("Cache-Control", "no-store"),
]


def escape(text):
    """html.escape(text, quote=True), without importing html.entities' 0.5 MB table."""
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;").replace("'", "&#x27;")
    )


class Page(bytes):
    """A whole page, and the language it is in (its Content-Language)."""

    language = "en"


def render_page(words, title, template, wide=False, picker="", **values):
    """A whole page in `words`' language: `template` filled with `values` (see fragment); `wide` for
    the admin page's lists, `picker` the language links (language_picker)."""
    body = fragment(template, words, **values)
    direction = ' dir="rtl"' if words.direction == "rtl" else ""
    page = Page(PAGE.format(lang=escape(words.tag), dir=direction, title=escape(title), css=PAGE_CSS, body=body,
                            wide=' class="wide"' if wide else "", picker=picker).encode())
    page.language = words.tag
    return page


class Markup(str):
    """Text that is already HTML (made by fragment()): filling a template does not escape it again."""


class _Texts:
    """A template's {t[key]}: the catalogue's text, escaped, with the template's own values filled in."""

    def __init__(self, words, values):
        self.words, self.values = words, values

    def __getitem__(self, key):
        return Markup(escape(self.words.text(key)).format(**self.values))


def fragment(template, words=None, **values):
    """`template` filled with `values`, each HTML-escaped unless it is Markup, and its {t[key]} texts
    in `words`' language; the result is Markup. The one way HTML is put together here, so no value
    (and no translation) is ever escaped by hand, or forgotten."""
    filled = {name: value if isinstance(value, Markup) else escape(str(value)) for name, value in values.items()}
    if words is not None:
        filled["t"] = _Texts(words, filled)
    return Markup(template.format(**filled))


def message_markup(message):
    return fragment(MESSAGE, message=message) if message else Markup("")


def language_picker(languages, words, **keep):
    """Links to this page in every shipped language, each in its own name; `keep` the query values the
    page needs again (next, invite), which its renderer has already judged."""
    links = []
    for catalogue in languages:
        if catalogue is words:
            links.append(fragment(LANGUAGE_HERE, tag=catalogue.tag, name=catalogue.name))
        else:
            query = urllib.parse.urlencode({**{k: v for k, v in keep.items() if v}, LANGUAGE_COOKIE: catalogue.tag})
            links.append(fragment(LANGUAGE_LINK, query=query, tag=catalogue.tag, name=catalogue.name))
    return fragment(LANGUAGE_PICKER, words, links=Markup(" ".join(links)))


def render_login(words, app_name, next_url, csrf, refusal=None, device_user=None, plain_http=False, picker=""):
    """The login page; a `refusal` (a _Refused) says why the last attempt failed."""
    message, disabled = (refusal.text(words), refusal.disabled) if refusal else ("", False)
    host = url_host(next_url) if next_url.startswith(("http://", "https://")) else ""
    subtitle = fragment(SUBTITLE, text=words.say("to_continue_to", host=host)) if host else Markup("")
    if device_user:
        subtitle = Markup(subtitle + fragment(SUBTITLE, text=words.say("signing_in_as", name=device_user)))
    forget = fragment(FORGET_DEVICE, words, next=next_url, csrf=csrf, name=device_user) if device_user else Markup("")
    return render_page(
        words,
        words.say("title_sign_in", app_name=app_name),
        LOGIN_FORM,
        picker=picker,
        app_name=app_name,
        subtitle=subtitle,
        message=message_markup(message),
        note=fragment(PLAIN_HTTP_NOTE, words) if plain_http else Markup(""),
        next=next_url,
        csrf=csrf,
        disabled=Markup(" disabled" if disabled else ""),
        otp_input=otp_input(autofocus=True, disabled=disabled),
        forget=forget,
    )


def group_secret(seed):
    """A base32 secret in groups of four, as people copy it: ABCD EFGH …"""
    return " ".join(seed[i : i + 4] for i in range(0, len(seed), 4))


def qr_svg(text):
    """`text` as an inline SVG QR code (no script, no data: URL, so the CSP stays strict)."""
    import segno  # only here and in the CLI: the serving process loads it on the first enrolment

    return segno.make(text, error="m").svg_inline(scale=4, dark="#000", light="#fff", border=4)


def page_time(words, epoch):
    """A stored time on a page: UTC ISO 8601, or the language's "never"."""
    return format_time(epoch) if epoch else words.say("never")


def wait_minutes(seconds):
    return max(1, math.ceil(seconds / 60))


def human_time(epoch, now, words):
    """A coming moment as people read it: "in 3 days, on Tuesday 1 December at 13:00 UTC"."""
    left = max(0, epoch - now)
    count, unit = next(((round(left / size), unit) for unit, size in TIME_UNITS if left >= size), (1, "in_minutes"))
    day = time.gmtime(epoch)
    date = words.say("date", weekday=words.words("weekdays")[day.tm_wday], day=day.tm_mday,
                     month=words.words("months")[day.tm_mon - 1], time=time.strftime("%H:%M", day))
    return words.say("moment", when=words.count(unit, count), date=date)


TIME_UNITS = (("in_days", 86400), ("in_hours", 3600), ("in_minutes", 60))


# --- Gate -------------------------------------------------------------------
# What a check decides from, all in memory: users and their host lists,
# deletions, revocations, app tokens. This is the hot path: a few dictionary
# lookups, no database access unless another process changed it.

# `token`: the credential was an app token; `basic`: it came as HTTP Basic;
# `headers`: the identity the apps behind receive with an ALLOW.
Decision = collections.namedtuple(
    "Decision", "verdict user host token basic headers", defaults=(None, None, False, False, ())
)
DENIED = Decision(Verdict.DENY)
IDENTITY_HEADERS = ("Remote-User", "Remote-Name", "Remote-Email", "Remote-Groups")
HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
HEADER_ASCII = re.compile(r"[\x21-\x7e]+([ ][\x21-\x7e]+)*", re.ASCII)  # printable, no edge spaces


def identity_headers(name, rule):
    """The four identity headers of a user, always all four (empty when unset), so a client's own
    copy never reaches the app; None if a stored value cannot be a header value.

    Remote-Name carries the name's UTF-8 bytes, as Authelia sends it (WSGI wants them as latin-1 text).
    """
    try:
        values = (name, rule.full_name.encode("utf-8").decode("latin-1"), rule.email.encode("ascii").decode(),
                  rule.groups.encode("ascii").decode())
    except (UnicodeError, AttributeError):  # AttributeError: not text at all (a hand-edited database)
        return None
    if not isinstance(name, str) or not HEADER_ASCII.fullmatch(name) or any(HEADER_UNSAFE.search(value) for value in values):
        return None
    return tuple(zip(IDENTITY_HEADERS, values))


def app_token_key(token):
    """The stored key (SHA-256) of a well-formed app token, or None: then it matches nothing."""
    return digest(token) if APP_TOKEN_SHAPE.fullmatch(token) else None


# One consistent picture of the database, swapped in by one assignment: a
# reader takes `gate.view` once and sees rules, deletions and tokens of the
# same moment. `revoked` is not of a moment: it is the Gate's one set of
# revocations, which only grows (under Gate._revocations_lock) until a token
# expires, so no reload can swap in a view without a revocation just made.
View = collections.namedtuple("View", "version rules deleted revoked app_tokens allowed")


def build_view(snapshot, revoked):
    """The View of a Snapshot. Nothing read from the database may fail a request later: a user
    whose stored name, identity, host list or times cannot be used is left out (one log line
    naming them), and so is a token of that kind; everyone else keeps working."""
    rules, allowed = {}, {}
    for name, rule in snapshot.rules.items():
        headers = identity_headers(name, rule)
        if headers is None or not isinstance(rule.sessions_after, int) or not isinstance(rule.hosts, str):
            log.warning("user %r skipped: a stored value cannot be used (a name or identity that cannot be "
                        "a header value, or a malformed host list)", name)
            continue
        try:
            rules[name] = rule._replace(hosts=_host_list(rule.hosts))
        except ValueError:  # a hand-edited pattern such as host:https
            log.warning("user %r skipped: the stored host list cannot be read", name)
            continue
        for token in (False, True):
            allowed[(name, token)] = Decision(Verdict.ALLOW, name, None, token, False, headers)
    app_tokens = {}
    for key, entry in snapshot.app_tokens.items():
        try:
            if not isinstance(entry.hosts, str) or not (entry.expires is None or isinstance(entry.expires, int)):
                raise ValueError("not text or a time")
            app_tokens[key] = entry._replace(hosts=_host_list(entry.hosts))
        except ValueError:
            log.warning("app token %r of %r skipped: its stored hosts or expiry cannot be used", entry.label, entry.user)
    deleted = {name: at for name, at in snapshot.deleted.items() if isinstance(at, int)}
    return View(snapshot.version, rules, deleted, revoked, app_tokens, allowed)


def _in_background(function, *args):
    """Run a database write off the request's thread: the write may wait for a lock."""
    threading.Thread(target=function, args=args, daemon=True).start()


def _host_list(text):
    """The HostList of a stored host list (None: every host)."""
    patterns = _hosts_rule(text)
    return None if patterns is None else HostList(patterns)


class Gate:
    """Turns a Request into a Decision, from a View of the database refreshed when it changes.

    Revocations that could not be written yet (the database was locked) are
    kept in memory, merged into every refresh and written when it lets us.
    """

    def __init__(self, store, session_key, cookie_name, session_ttl=86400, session_max=2592000, history_days=None):
        self.store = store
        self.history_days = history_days
        self.session_key = session_key
        self.cookie_name = cookie_name
        self.session_ttl = session_ttl
        self.session_max = session_max
        self.renew_after = session_ttl - session_ttl // 2  # seconds left when a navigation renews
        self._revoked = {}  # jti -> expires: every revocation of a token that has not expired
        self._revoked_seq = 0  # the database's revocations up to this number are in _revoked
        self._unwritten = {}  # jti -> expires: revocations the database has not taken yet
        self._revocations_lock = threading.Lock()  # guards _revoked, _revoked_seq and _unwritten
        self.view = View(None, {}, {}, self._revoked, {}, {})
        self._claims = {}  # SHA-256 of a Cookie header -> claims of its session cookies whose signature holds
        self._last_used = {}  # SHA-256 -> when, written in batches
        self._seen = {}  # jti -> when its session was last allowed, written in batches (-sessions "last seen")
        self._next_flush = 0.0
        self._next_purge = None
        self._next_refresh = 0.0
        self._next_token_check = 0.0
        self._refresh_lock = threading.Lock()

    # -- Keeping up with the database --

    def refresh(self, now, force=False, due=False):
        """Reload the View if any connection changed the database (`force`: reload anyway).

        /verify calls this at most every REFRESH_SECONDS (`due`: now): one PRAGMA,
        no table read unless something changed. Without `force` it never waits
        for another thread's refresh; the PRAGMA itself may wait for the watch
        connection (at most its 100 ms busy timeout).
        """
        if not (force or due) and self._next_refresh - REFRESH_SECONDS <= now < self._next_refresh:
            return  # checked recently (a clock set back counts as due)
        if not self._refresh_lock.acquire(blocking=force):
            return  # another thread is already looking
        try:
            self._next_refresh = now + REFRESH_SECONDS
            with contextlib.suppress(sqlite3.Error):  # still locked: kept, and tried at the next refresh
                self._write_unwritten()
            if force or self.store.data_version() != self.view.version:
                self._load(self.store.snapshot(self._revoked_seq), now)
            self._flush_if_due(now)
            self._purge_if_due(now)
        except sqlite3.Error as error:
            log.warning("cannot refresh from the database, serving from memory: %s", error)
        finally:
            self._refresh_lock.release()

    def _load(self, snapshot, now):
        """Swap in the View of `snapshot`, its new revocations added to the ones held (never replacing them)."""
        with self._revocations_lock:
            self._revoked.update(snapshot.revoked)
            self._revoked_seq = snapshot.revoked_seq
            # Expired tokens need no revocation; one whose stored expiry is not a number stays revoked.
            for jti in [jti for jti, exp in self._revoked.items() if isinstance(exp, int) and exp <= now]:
                del self._revoked[jti]
            self.view = build_view(snapshot, self._revoked)

    def _write_unwritten(self, wait=False):
        """Write the revocations the database has not taken yet (`wait`: as long as a write may wait)."""
        with self._revocations_lock:
            pending = dict(self._unwritten)
        if pending:
            self.store.revoke(pending, quick=not wait)
            with self._revocations_lock:
                for jti in pending:
                    self._unwritten.pop(jti, None)

    def revoke(self, jti, expires):
        """End one session: at once in this process, in the database as soon as it lets us."""
        with self._revocations_lock:
            self._revoked[jti] = expires
            self._unwritten[jti] = expires
        try:
            self._write_unwritten()
        except sqlite3.Error as error:
            log.warning("logout kept in memory until the database answers: %s", error)

    def write_before_stopping(self):
        """At shutdown: logouts held in memory must not be lost with the process (a restart would
        bring those sessions back), nor the app tokens' last-used times."""
        try:
            self._write_unwritten(wait=True)
        except sqlite3.Error as error:
            log.error("%d logouts could not be written and are lost with this process: %s", len(self._unwritten), error)
        self.flush_last_used()

    def flush_last_used(self):
        """Write the app tokens' last-used and the sessions' last-seen times collected so far (also at shutdown)."""
        batch, self._last_used = self._last_used, {}
        if batch:
            try:
                self.store.touch_app_tokens(batch)
            except sqlite3.Error:
                for key, when in batch.items():
                    self._last_used.setdefault(key, when)  # try again next time
        seen, self._seen = self._seen, {}
        if seen:
            try:
                self.store.touch_sessions(seen)
            except sqlite3.Error:  # a last-seen time is worth no retry: the next use writes it again
                pass

    def _flush_if_due(self, now):
        if (self._last_used or self._seen) and not self._next_flush - LAST_USED_SECONDS <= now < self._next_flush:
            self._next_flush = now + LAST_USED_SECONDS
            _in_background(self.flush_last_used)

    def _purge_if_due(self, now):
        """Expired revocations and session records go on a schedule, not only at a logout: a
        household that never signs out must not grow the table each reload reads."""
        if self._next_purge is None:  # the first refresh, at start: no request waits for it
            self._next_purge = now + PURGE_SECONDS
            self.purge_expired(now)
        elif not self._next_purge - PURGE_SECONDS <= now < self._next_purge:
            self._next_purge = now + PURGE_SECONDS
            _in_background(self.purge_expired, now)

    def purge_expired(self, now):
        try:
            self.store.purge_expired(now, history_before=self.history_days and now - self.history_days * 86400)
        except sqlite3.Error as error:  # locked or closed: the next schedule tries again
            log.warning("cannot purge expired sessions yet: %s", error)

    def user_count(self):
        return len(self.view.rules)

    # -- Sessions and devices --

    def session(self, request):
        """The claims of the valid session cookie of this request, or None (see _live_session)."""
        self.refresh(request.now)
        return self._live_session(request, self.view)

    def _live_session(self, request, view):
        """The claims of a valid session cookie, or None.

        Every value of the cookie name is judged; values that are valid for
        different users count as none (a sibling subdomain planted one).
        """
        header = request.cookie_header
        if not header:
            return None
        # Keyed by a digest, so no raw token is held: hashing costs 1 µs, verifying a token 10.
        memo_key = hashlib.sha256(header.encode("latin-1")).digest()
        signed = self._claims.get(memo_key)
        if signed is None:
            signed = self._signed_sessions(request, memo_key)
        now, found = request.now, None
        for claims in signed:
            # Checked on every request, cached or not: expiry, revocation, the user.
            if claims["until"] > now and claims["jti"] not in view.revoked and self._current(claims, view):
                if found is not None and found["sub"] != claims["sub"]:
                    return None
                found = found or claims
        return found

    def ended_session(self, request):
        """The claims of a session cookie that is signed, unexpired by its own `exp` and of a current
        user, but not live: revoked (a renewal replaced it, perhaps a thief's), or past a lifetime
        lowered since it was issued (which raising it again would bring back). Or None. Signing out
        with it still ends its session, for good."""
        header = request.cookie_header
        if not header:
            return None
        view = self.view
        return next((claims for claims in self._signed_sessions(request, None)
                     if claims["exp"] > request.now and self._current(claims, view)
                     and (claims["jti"] in view.revoked or claims["until"] <= request.now)), None)

    def _signed_sessions(self, request, memo_key):
        signed = []
        for token in request.cookie_values(self.cookie_name):
            claims, _reason = verify_token(token, self.session_key, request.now)
            if claims is not None:
                claims["until"] = self._until(claims)
                signed.append(claims)
        if signed and memo_key:  # only headers with a valid signature: a stranger's junk is never kept
            if len(self._claims) >= TOKEN_CACHE_SIZE:
                self._claims.clear()
            self._claims[memo_key] = signed
        return signed

    def _until(self, claims):
        """When a session ends by today's settings: its token's `exp`, or sooner where a lower
        SESSION_TTL_SECONDS (from `iat`, its last issue) or SESSION_MAX_SECONDS (from its login)
        says so. A token carries the lifetimes of the day it was issued; lowering them after a
        restart must shorten the sessions already out there too (SPEC, the first week). `exp`
        itself stays what was signed: a revocation is kept until then, so raising the lifetimes
        again cannot bring a revoked session back."""
        return min(claims["exp"], claims["iat"] + self.session_ttl, login_time(claims) + self.session_max)

    @staticmethod
    def _current(claims, view):
        """The session's user exists, and was neither deleted nor had their sessions ended since its login."""
        rule = view.rules.get(claims["sub"])
        login = login_time(claims)
        return rule is not None and login > view.deleted.get(claims["sub"], -1) and login >= rule.sessions_after

    def device_user_exists(self, claims):
        """A device cookie's user exists and was not deleted since it was issued. Ending sessions
        does not end a device: it only narrows which seed a code is tried against."""
        view = self.view
        return claims["sub"] in view.rules and claims["iat"] > view.deleted.get(claims["sub"], -1)

    def renewal(self, claims, now):
        """The claims a renewed session gets, or None: only a session past half its idle lifetime
        renews (a fresher one would gain little and cost a revocation), and never past its cap."""
        if claims["until"] - now >= self.renew_after:
            return None
        login = login_time(claims)
        expires = min(int(now) + self.session_ttl, login + self.session_max)
        if expires <= claims["until"]:
            return None
        renewed = new_claims(claims["sub"], now, 0, login)
        renewed["exp"], renewed["sid"] = expires, session_id(claims)
        return renewed

    # -- The decision --

    def decide(self, request):
        """ALLOW (user), RENEW, FORBIDDEN (user, host), DENY, or BAD_TOKEN for a failed app token."""
        self.refresh(request.now)
        view = self.view
        presented = request.authorization and presented_app_token(request.authorization)
        if presented:
            return self._decide_app_token(request, view, *presented)
        claims = self._live_session(request, view)
        if claims is None:
            return DENIED
        name = claims["sub"]
        self._seen[claims["jti"]] = request.now
        hosts = view.rules[name].hosts
        decision = view.allowed[(name, False)] if hosts is None else self._by_host(request, view, name, hosts)
        # One comparison on the hot path: renewal is looked at only past half the idle lifetime.
        if claims["until"] - request.now < self.renew_after and decision.verdict is Verdict.ALLOW:
            return self._renewal_due(request, claims) or decision
        return decision

    def _renewal_due(self, request, claims):
        """RENEW for a browser navigation (GET/HEAD: never lose a form) to a known URL, when renewing gains time."""
        if request.wants_html and request.original_url and self.renewal(claims, request.now):
            return Decision(Verdict.RENEW, claims["sub"])
        return None

    def _decide_app_token(self, request, view, token, basic_user):
        key = app_token_key(token)
        entry = view.app_tokens.get(key)
        if entry is None and key is not None and self._check_tokens_now(request.now):
            view = self.view  # created a moment ago by -token: a script may use it at once
            entry = view.app_tokens.get(key)
        rule = entry and view.rules.get(entry.user)
        basic = basic_user is not None
        if (
            rule is None
            or (entry.expires is not None and entry.expires <= request.now)
            or (basic and basic_user != entry.user)
        ):
            return Decision(Verdict.BAD_TOKEN, token=True, basic=basic)
        self._last_used[key] = request.now
        return self._by_host(request, view, entry.user, rule.hosts, entry.hosts, token=True)

    def _check_tokens_now(self, now):
        """Refresh now for an unknown token, at most every TOKEN_CHECK_SECONDS: a flood of wrong tokens costs nothing."""
        if self._next_token_check - TOKEN_CHECK_SECONDS <= now < self._next_token_check:
            return False
        self._next_token_check = now + TOKEN_CHECK_SECONDS
        self.refresh(now, due=True)
        return True

    @staticmethod
    def _by_host(request, view, name, hosts, token_hosts=None, token=False):
        """ALLOW unless a HostList (None: every host) leaves out the original host; no host, no entry."""
        if hosts is not None or token_hosts is not None:
            host = request.original_host
            for allowed in (hosts, token_hosts):
                if allowed is not None and (host is None or not allowed.matches(*host)):
                    return Decision(Verdict.FORBIDDEN, name, host and host[0], token)
        return view.allowed[(name, token)]


# --- Sign-in ----------------------------------------------------------------
# The people's side: the cookies this service sets, the login form and its guessing
# limits, renewal, and invitations. The Gate decides checks; these decide sign-ins.


class _Refused(Exception):
    """A login attempt refused: the form again with why (`say`, a key of the pages' texts, filled with
    `values`), passed whole to the page that renders it in the visitor's language."""

    def __init__(self, status, say, headers=(), disabled=False, **values):
        super().__init__(say)
        self.status, self.say, self.values, self.headers, self.disabled = status, say, values, list(headers), disabled

    def text(self, words):
        if isinstance(ENGLISH[self.say], list):
            return words.count(self.say, **self.values)
        return words.say(self.say, **self.values)


HTML = ("Content-Type", "text/html; charset=utf-8")


def page_headers(page):
    """A page's type and language; it differs by Accept-Language and the `lang` cookie (and no-store
    keeps it out of every cache anyway)."""
    return [HTML, ("Content-Language", page.language), PAGE_VARY]


def html_page(status, page, headers=()):
    """A page answer: its type, language and the headers given (cookies, Retry-After)."""
    return status, [*page_headers(page), *headers], bytes(page)  # WSGI wants bytes themselves (PEP 3333)


class Cookies:
    """The cookies this service sets and reads: the session, the device, the pre-login CSRF nonce."""

    def __init__(self, settings, key):
        self.settings = settings
        self.session_key = key
        self.device_key = derive_key(key, "device")  # a device cookie never passes as a session
        self.csrf_key = derive_key(key, "csrf")
        self.admin_key = derive_key(key, "admin")
        self.session_name = settings.cookie_name
        self.device_name = settings.cookie_name + "_device"
        self.csrf_name = settings.cookie_name + "_csrf"
        self.admin_name = settings.cookie_name + "_admin"
        self.admin_path = settings.login.path + ADMIN_SUFFIX

    def login(self, claims):
        """Set-Cookie headers for a login: a fresh session, and the device cookie re-issued."""
        device = sign_token(new_claims(claims["sub"], claims["iat"], DEVICE_COOKIE_SECONDS), self.device_key)
        return [self.session(claims), ("Set-Cookie", self.header(self.device_name, device, DEVICE_COOKIE_SECONDS, "Strict"))]

    def session(self, claims):
        """The Set-Cookie header of a session token; the browser keeps it until the token expires."""
        token = sign_token(claims, self.session_key)
        return ("Set-Cookie", self.header(self.session_name, token, claims["exp"] - claims["iat"], self.settings.same_site))

    def expired_session(self):
        return ("Set-Cookie", self.header(self.session_name, "", 0, self.settings.same_site))

    def fresh(self, claims, now):
        """The admin page's cookie: a code was typed in this session at `now`. Path-scoped to the admin
        page and host-only, as Vaultwarden scopes its admin cookie: no app behind ever receives it (a
        proxy that passes forward-auth's cookies on, Traefik's, passes the session cookie, not this),
        and SameSite=Strict: a link from another site opens the page without it."""
        lifetime = self.settings.admin_fresh
        # exp one second past: "at most ADMIN_FRESH_SECONDS ago" includes the last second (fresh_for decides).
        token = sign_token({"sub": claims["sub"], "iat": int(now), "exp": int(now) + lifetime + 1,
                            "jti": secrets.token_urlsafe(16), "sid": session_id(claims)}, self.admin_key)
        return ("Set-Cookie", self.header(self.admin_name, token, lifetime, "Strict", domain=False,
                                          path=self.admin_path))

    def expired_fresh(self):
        return ("Set-Cookie", self.header(self.admin_name, "", 0, "Strict", domain=False, path=self.admin_path))

    def fresh_for(self, request, claims):
        """Whether a valid admin cookie says a code was typed in this very session lately."""
        for token in request.cookie_values(self.admin_name):
            fresh, _ = verify_token(token, self.admin_key, request.now)
            if (fresh is not None and fresh["sub"] == claims["sub"] and fresh.get("sid") == session_id(claims)
                    and 0 <= request.now - fresh["iat"] <= self.settings.admin_fresh):
                return True
        return False

    def language(self, tag):
        """The visitor's pick of a language, for a year. Host-only, on the login host: every app behind
        a COOKIE_DOMAIN would get it too, and many keep a `lang` cookie of their own."""
        return ("Set-Cookie", self.header(LANGUAGE_COOKIE, tag, LANGUAGE_COOKIE_SECONDS, "Lax", domain=False))

    def expired_device(self):
        return ("Set-Cookie", self.header(self.device_name, "", 0, "Strict"))

    def header(self, name, value, max_age, same_site, domain=True, path="/"):
        parts = [f"{name}={value}", f"Path={path}"]
        if max_age is not None:
            parts.append(f"Max-Age={max_age}")
            if max_age == 0:
                parts.append("Expires=Thu, 01 Jan 1970 00:00:00 GMT")
        if domain and self.settings.cookie_domain:
            parts.append(f"Domain={self.settings.cookie_domain}")
        parts.append("HttpOnly")
        if self.settings.secure_cookies:
            parts.append("Secure")
        parts.append(f"SameSite={same_site}")
        return "; ".join(parts)

    def device(self, request, gate):
        """The claims of a valid device cookie of an existing user, or None. Every value is judged;
        values valid for different users count as none (a sibling subdomain planted one)."""
        found = None
        for token in request.cookie_values(self.device_name):
            claims, _ = verify_token(token, self.device_key, request.now)
            if claims is not None and gate.device_user_exists(claims):
                if found is not None and found["sub"] != claims["sub"]:
                    return None
                found = found or claims
        return found

    def csrf(self, request):
        """(the form's CSRF token, the Set-Cookie headers of the pre-login cookie if the browser has none)."""
        nonce = next((v for v in request.cookie_values(self.csrf_name) if INVITE_SHAPE.fullmatch(v)), None)
        if nonce is not None:
            return self.csrf_token(nonce), []
        nonce = secrets.token_urlsafe(32)
        return self.csrf_token(nonce), [("Set-Cookie", self.header(self.csrf_name, nonce, None, "Lax", domain=False))]

    def csrf_token(self, nonce):
        return _b64encode(hmac.new(self.csrf_key, nonce.encode(), hashlib.sha256).digest())

    def csrf_valid(self, request, given):
        given = given.encode("utf-8")  # bytes: compare_digest refuses non-ASCII str
        return any(
            hmac.compare_digest(self.csrf_token(nonce).encode(), given)
            for nonce in request.cookie_values(self.csrf_name)
            if nonce
        )


class SignIn:
    """The login page and form: codes judged within the guessing limits, devices, the signed-in page."""

    def __init__(self, settings, *, store, gate, cookies, limiter, metrics, journal, languages):
        self.settings = settings
        self.store = store
        self.gate = gate
        self.cookies = cookies
        self.languages = languages
        self.limiter = limiter
        self.metrics = metrics
        self.journal = journal
        # Attempts the limits refused: one history line a minute for all of them together, with their
        # count (a line per client would let a flood from many addresses fill the file).
        self._limited_lines = Throttle()
        self._limited_since = collections.Counter()
        self._limited_lock = threading.Lock()
        self._refused_next_lines = Throttle()
        self._warned_plain_http = False
        self._unusable_seeds = set()  # users already logged as having a seed pyotp cannot use

    def page(self, request):
        """GET /login: the form; signed in, the page that offers to sign out, or on to `next`
        (with renew=1, after issuing a renewed session cookie)."""
        next_value = request.query.get("next", request.query.get("redirect_uri", ""))
        claims = self.gate.session(request)
        if claims is None:
            return self.form(request, next_value)
        if request.query.get("renew") == "1":
            return self._renew(request, claims, self.safe_next(request, next_value))
        if next_value:
            return 302, [("Location", self.safe_next(request, next_value))], b""
        return self.signed_in_page(request, claims)

    def signed_in_page(self, request, claims):
        """Where a sign-in with nowhere to go lands: who this is, sign out, and the admin page for admins."""
        csrf, cookie = self.cookies.csrf(request)
        rule = self.gate.view.rules.get(claims["sub"])
        full_name = rule.full_name if rule and rule.full_name else claims["sub"]
        admin = rule is not None and is_admin_rule(self.settings, rule)
        words = self.languages.choose(request)
        link = fragment(ADMIN_LINK, words, admin=self.settings.login.url + ADMIN_SUFFIX) if admin else Markup("")
        page = render_page(words, self.settings.app_name, SIGNED_IN, app_name=self.settings.app_name, name=full_name,
                           user=claims["sub"], csrf=csrf, logout=self.logout_url(), admin=link,
                           picker=language_picker(self.languages, words))
        return html_page(200, page, cookie)

    def form(self, request, next_value, refusal=None):
        """The login page, with why the last attempt was refused; it carries only a validated next."""
        csrf, cookie = self.cookies.csrf(request)
        device = self.cookies.device(request, self.gate)
        words = self.languages.choose(request)
        target = self.safe_next(request, next_value)
        page = render_login(
            words, self.settings.app_name, target, csrf, refusal, device["sub"] if device else None,
            self._cookies_will_be_dropped(request),
            picker=language_picker(self.languages, words, next=target if target != "/" else ""),
        )
        if refusal is None:
            return html_page(200, page, cookie)
        return html_page(refusal.status, page, [*refusal.headers, *cookie])

    def _cookies_will_be_dropped(self, request):
        """Plain HTTP with Secure cookies: the browser drops them (http://localhost excepted), so the
        login seems to work and then lands on the login page again. Say so, and log it once."""
        origin = request.origin
        if not self.settings.secure_cookies or origin is None or origin[0] != "http":
            return False
        if split_host(origin[1])[0] in ("localhost", "127.0.0.1", "[::1]"):
            return False  # browsers keep Secure cookies on http://localhost
        if not self._warned_plain_http:
            self._warned_plain_http = True
            log.warning("a login page went out over plain HTTP while SECURE_COOKIES=true: browsers will drop "
                        "the session cookie (serve it over HTTPS, or set SECURE_COOKIES=false)")
        return True

    def submit(self, request, form):
        """POST /login: a code (or "Not NAME?"); 302 with cookies, or the form again with why not."""
        next_value = form.get("next", request.query.get("next", request.query.get("redirect_uri", "")))
        self.gate.refresh(request.now)
        try:
            self.guard(request, form)
            if form.get("action") == "forget":
                return self._forget_device(request, next_value)
            device = self.cookies.device(request, self.gate)
            # A browser bound to one person tries only that person's code, so naming them tells a
            # stranger nothing, and points whoever it is not at "Not NAME?" before the lockout.
            wrong = _Refused(401, "wrong_code_for", name=device["sub"]) if device else None
            claims = self.attempt(request, device, lambda: self._judge_code(request, form.get("otp", ""), device),
                                  wrong=wrong)
        except _Refused as refusal:
            return self.form(request, next_value, refusal)
        return self.signed_in(request, claims, self.landing(request, next_value))

    def landing(self, request, next_value):
        """`next` if it is usable, else the signed-in page: the login host's own / is a 404 behind a
        shared login host (SPEC, the first week). A refused `next` is logged with why, once a minute."""
        target, refused = judge_next(next_value, self._login_host(request), self.settings)
        if refused and self._refused_next_lines.due(refused, request.now):
            log.warning("a sign-in's next was refused (%s): it lands on the signed-in page", refused)
        if target == "/" and next_value != "/":
            return self.settings.login.url
        return target

    def guard(self, request, form):
        """Refuse a cross-site POST (403, no form) and a bad CSRF token (_Refused 403)."""
        if is_cross_site(request.sec_fetch_site, request.origin_header, request.origin):
            self.count(Outcome.CROSS_SITE, None, request)
            raise HTTPError(403, b"Cross-site request refused\n", say="cross_site")
        if not self.cookies.csrf_valid(request, form.get("csrf", "")):
            self.count(Outcome.CSRF, None, request)
            if self._cookies_will_be_dropped(request):  # the reason, not what it looks like (SPEC, first week)
                raise _Refused(403, "plain_http_refused")
            raise _Refused(403, "form_expired")

    def attempt(self, request, device, judge, group=None, event="sign-in", user=None, wrong=None):
        """Run `judge` within the guessing limits; the new session's claims, or _Refused.

        A device is limited per device; anyone else per client IP and by the global ceiling
        of anonymous clients, or (an invitation's first code, tried against one pending seed)
        by its `group`'s own limit instead: a stranger's lockout does not stop the invitee,
        and one link from many addresses still gets five guesses a window. Every attempt is
        in the history as `event` (a sign-in, a fresh code, an invitation's first code) of
        `user` where it is known.
        """
        key = f"device:{device['jti']}" if device else limiter_key(request.ip)
        user = user or (device and device["sub"]) or None
        limits = {"device": device is not None, "group": group, "now": request.now}
        wait = self.limiter.acquire(key, owner=device and device["sub"], **limits)
        if wait:
            self.count(Outcome.LIMITED, None, request)
            self._remember_refused(event, user, request, device)
            raise _Refused(429, "too_many", [("Retry-After", str(wait))], disabled=True, n=wait_minutes(wait))
        failed_before = self.limiter.failures(key, request.now)
        outcome, claims = Outcome.UNDECIDED, None
        try:
            outcome, claims = judge()
        except sqlite3.Error as error:
            log.warning("login unavailable: database error: %s", error)
            raise _Refused(503, "unavailable", [("Retry-After", "5")])
        finally:
            self.limiter.release(key, outcome=outcome, **limits)
        self.count(outcome, claims and claims["sub"], request)
        self.remember(event, outcome, claims["sub"] if claims else user, request, device, failed_before)
        if outcome is Outcome.REPLAY:
            raise _Refused(401, "code_used")
        if outcome is not Outcome.SUCCESS:
            raise wrong or _Refused(401, "wrong_code")
        return claims

    def _remember_refused(self, event, user, request, device):
        """The history line of refused attempts: the first in a minute, with how many were refused since."""
        with self._limited_lock:
            self._limited_since[event] += 1
            if not self._limited_lines.due(event, request.now):
                return
            count, self._limited_since[event] = self._limited_since[event], 0
        detail = f"{count} refused since the last such line" if count > 1 else ""
        self.journal.record(attempt_event(event, Outcome.LIMITED), user, request.now, ip=str(request.ip),
                            agent=request.user_agent, device="known" if device else "new", detail=detail)

    def remember(self, event, outcome, user, request, device, failed_before=0):
        """The history line of an attempt; a sign-in from a new device (no valid device cookie of that
        user) or after failed attempts in this window is notified, as an invitation used always is."""
        success = outcome is Outcome.SUCCESS
        name = attempt_event(event, outcome)
        known = device is not None and device["sub"] == user
        detail = f"after {failed_before} failed attempt{'s' if failed_before != 1 else ''}" if success and failed_before \
            else ""
        notify = (success and (event == "invitation-used" or (event == "sign-in" and not known) or failed_before)
                  or (name == "fresh-code-failed"))
        self.journal.record(name, user, request.now, ip=str(request.ip), agent=request.user_agent,
                            device=("known" if known else "new") if event != "fresh-code" or success else "",
                            detail=detail, notify=notify)

    def _renew(self, request, claims, location):
        """A fresh session cookie for a session past half its idle lifetime: a new `jti` (the old one
        revoked), the same login and session record, expiry now + idle lifetime but never past the cap."""
        renewed = self.gate.renewal(claims, request.now)
        if renewed is None:  # fresh enough, or at its cap: on to `next` unchanged
            return 302, [("Location", location)], b""
        if not self.store.renew_session(claims["jti"], claims["exp"], session_record(renewed, request)):
            return self._lost_renewal(request, claims, renewed, location)
        self.gate.revoke(claims["jti"], claims["exp"])
        log.info("renew user=%s ip=%s", claims["sub"], request.ip)
        self.journal.record("renewal", claims["sub"], request.now, ip=str(request.ip), agent=request.user_agent)
        return 302, [self.cookies.session(renewed), ("Location", location)], b""

    def _lost_renewal(self, request, claims, renewed, location):
        """Another request renewed this token a moment ago (tabs restored at once share one cookie):
        this one answers with a cookie of the winner's token (same `jti` and expiry, so a sign-out
        ends both), never the login form. Ended by a logout meanwhile: the login form."""
        current = self.store.current_token(session_id(claims), request.now)
        if current is None:
            return self.form(request, request.query.get("next", ""))
        winner = dict(renewed, jti=current[0], exp=current[1])
        return 302, [self.cookies.session(winner), ("Location", location)], b""

    def _usable(self, users):
        """Users whose seed opened and is one pyotp can use; each other one is logged once and
        skipped: a seed that does not open means "cannot sign in", never "no seed"."""
        usable = []
        for user in users:
            if user.seed is not None and usable_seed(user.seed) and isinstance(user.last_step, int):
                usable.append(user)
            elif user.name not in self._unusable_seeds:
                self._unusable_seeds.add(user.name)
                why = ("does not open with the storage key (damaged, or copied from another row)" if user.seed is None
                       else "is not base32 (or their last step not a number)")
                log.warning("user %r cannot sign in: their stored seed %s; reset them with -invite %s",
                            user.name, why, user.name)
        return usable

    def _judge_code(self, request, code, device):
        """(outcome, claims). With a device cookie only its own user's seed is tried: an
        enrolled user minting device cookies must get no guesses at other users' codes."""
        users = self.store.active_users()
        if device is not None:
            users = [user for user in users if user.name == device["sub"]]
        found = match_code(code, self._usable(users), request.now)
        if found is None:
            return Outcome.FAILURE, None
        user, step = found
        claims = new_claims(user.name, request.now, self.settings.session_ttl)
        if not self.store.accept_login(user.name, step, session_record(claims, request)):
            return Outcome.REPLAY, claims  # RFC 6238 §5.2: one use per code
        return Outcome.SUCCESS, claims

    def signed_in(self, request, claims, location):
        if claims["sub"] not in self.gate.view.rules:
            self.gate.refresh(request.now, due=True)  # new to this process (made a moment ago by the CLI)
        rule = self.gate.view.rules.get(claims["sub"])
        # The sign-in's code counts as the admin page's fresh code.
        fresh = [self.cookies.fresh(claims, request.now)] if rule and is_admin_rule(self.settings, rule) else []
        return 302, [*self.cookies.login(claims), *fresh, ("Location", location)], b""

    def _forget_device(self, request, next_value):
        """"Not NAME?": drop the device cookie; from then on the anonymous limits apply."""
        target = self.safe_next(request, next_value)
        query = f"?next={urllib.parse.quote(target, safe='')}" if target != "/" else ""
        return 302, [self.cookies.expired_device(), ("Location", self.settings.login.url + query)], b""

    def count(self, outcome, user, request):
        """Count a login attempt and log it: one line, fail2ban-ready, never a code."""
        self.metrics.count_login(outcome)
        if self.settings.log_format == "json":
            log.info(json.dumps({"event": "login", "result": outcome.value, "user": user or "-", "ip": str(request.ip)}))
        else:
            log.info("login result=%s user=%s ip=%s", outcome.value, user or "-", request.ip)

    def safe_next(self, request, value):
        return safe_next(value, self._login_host(request), self.settings)

    def _login_host(self, request):
        if self.settings.login.host:
            return self.settings.login.host
        if request.origin is None:
            raise HTTPError(400, b"Bad forwarded scheme or host\n", say="bad_forwarded")
        return request.origin[1]

    def logout_url(self):
        login = self.settings.login
        return (login.base or "") + login.logout_path


def session_record(claims, request):
    """The sessions-table row of a login: when, who, from where, with what."""
    return SessionRecord(
        claims["jti"], claims["sub"], login_time(claims), claims["exp"], str(request.ip), request.user_agent,
        session_id(claims), issued=claims["iat"],
    )


class Enrolment:
    """Invitation links: a page with one button, the seed once asked for, the first code to finish."""

    def __init__(self, settings, *, store, cookies, signin):
        self.settings = settings
        self.store = store
        self.cookies = cookies
        self.signin = signin  # the guard, the limits and the session every sign-in shares

    def _live_invite(self, request, token):
        """The invitation of a link, or HTTPError 410 with the page that says to ask for a new one
        (also for a stored invitation that cannot be used: one log line names its user)."""
        invite = self.store.invite(digest(token), request.now) if INVITE_SHAPE.fullmatch(token) else None
        if invite is not None and not (invite_readable(invite) and usable_seed(invite.seed)):
            log.warning("invitation of %r refused: its stored seed does not open with the storage key, or a stored "
                        "value cannot be used (make a new one with -invite)", invite.user)
            invite = None
        if invite is None:
            raise self._gone(request, INVITE_GONE)
        return invite

    def _gone(self, request, template):
        words = self.signin.languages.choose(request)
        page = render_page(words, words.say("title_link_expired", app_name=self.settings.app_name), template)
        return HTTPError(410, bytes(page), page_headers(page))

    def page(self, request, token, status=200):
        """The first step: one button, and no seed (chat apps fetch links to draw previews)."""
        invite = self._live_invite(request, token)
        csrf, cookie = self.cookies.csrf(request)
        words = self.signin.languages.choose(request)
        page = render_page(
            words, words.say("title_set_up", app_name=self.settings.app_name), INVITE_START,
            picker=language_picker(self.signin.languages, words, invite=token), app_name=self.settings.app_name,
            name=invite.user, invite=token, csrf=csrf, when=human_time(invite.expires, request.now, words),
            replaces=self._replaces_note(invite, words),
        )
        return html_page(status, page, cookie)

    def submit(self, request, form):
        """The button binds the link to this browser and shows the seed; a right first code
        activates it and signs the person in. Any other browser gets 410."""
        token = form.get("invite", "")
        try:
            self.signin.guard(request, form)
        except _Refused:
            return self.page(request, token, status=403)
        invite = self._live_invite(request, token)
        if "otp" not in form:
            return self._open(request, token, invite)
        browser = self._bound_browser(request, invite)
        if browser is None:
            raise self._gone(request, INVITE_ELSEWHERE)
        try:
            judge = functools.partial(self._judge, request, form["otp"], token, browser, invite)
            # Tried against this one pending seed: the per-IP limit, never the anonymous ceiling.
            claims = self.signin.attempt(request, None, judge, group="invite:" + digest(token),
                                         event="invitation-used", user=invite.user)
        except _Refused as refusal:
            return self._setup(request, token, invite, refusal)
        log.info("invite result=accepted user=%s ip=%s", invite.user, request.ip)
        return self.signin.signed_in(request, claims, self.settings.login.url)

    def _open(self, request, token, invite):
        """The button: bind the pending seed to this browser (a fresh cookie), unless a browser has it.

        The cookie's value is always made here: a value a sibling subdomain planted
        in the invitee's browser must not become the binding it then also holds.
        """
        if invite.browser is not None:
            if self._bound_browser(request, invite) is None:
                raise self._gone(request, INVITE_ELSEWHERE)
            return self._setup(request, token, invite)  # a reload in the browser that pressed it
        nonce = secrets.token_urlsafe(32)
        if not self.store.open_invite(digest(token), digest(nonce), request.now):
            raise self._gone(request, INVITE_ELSEWHERE)  # another browser pressed it a moment ago
        log.info("invite result=opened user=%s ip=%s", invite.user, request.ip)
        self.signin.journal.record("invitation-opened", invite.user, request.now, ip=str(request.ip),
                                   agent=request.user_agent)
        lifetime = max(1, int(invite.expires - request.now))
        # Path: the login page only, so the apps on this host never receive it.
        path = self.settings.login.path
        bound = self.cookies.header(self.cookie_name, nonce, lifetime, "Lax", domain=False, path=path)
        return self._setup(request, token, invite, bound_cookie=[("Set-Cookie", bound)])

    @property
    def cookie_name(self):
        return self.settings.cookie_name + "_invite"

    def _bound_browser(self, request, invite):
        """The digest of this browser's binding cookie if it is the one the invitation is bound to; every
        value of the name is judged (a planted value must not shadow the real one)."""
        for nonce in request.cookie_values(self.cookie_name):
            if INVITE_SHAPE.fullmatch(nonce) and invite.browser is not None and hmac.compare_digest(
                digest(nonce), invite.browser
            ):
                return invite.browser
        return None

    def _judge(self, request, code, token, browser, invite):
        pending = User(invite.user, invite.seed, 0, None, -1)
        found = match_code(code, self.signin._usable([pending]), request.now)
        if found is None:
            return Outcome.FAILURE, None
        claims = new_claims(invite.user, request.now, self.settings.session_ttl)
        if not self.store.accept_invite(digest(token), browser, found[1], session_record(claims, request)):
            raise self._gone(request, INVITE_GONE)  # finished in another tab a moment ago: counts nothing
        return Outcome.SUCCESS, claims

    def _replaces_note(self, invite, words):
        """After a reset (a lost phone), the new link says the old entry in the authenticator app no longer
        works (not a "Wrong code" later). Said here, to whoever holds the new link, and not to a browser
        holding the person's device cookie: that may be the lost phone itself (red team, issue 27)."""
        user = self.store.user(invite.user)
        replaced = user is not None and user.last_login is not None  # signed in before: a reset, not a newcomer
        return fragment(REPLACES_NOTE, words, app_name=self.settings.app_name) if replaced else Markup("")

    def _setup(self, request, token, invite, refusal=None, bound_cookie=()):
        """The second step: QR code, the secret in groups of four, the otpauth link, a field for the
        first code; with a refusal, why the last code was not taken."""
        csrf, cookie = self.cookies.csrf(request)
        words = self.signin.languages.choose(request)
        message, disabled = (refusal.text(words), refusal.disabled) if refusal else ("", False)
        uri = enrolment_uri(invite.seed, invite.user, self.settings.app_name)
        page = render_page(
            words, words.say("title_set_up", app_name=self.settings.app_name), INVITE_SETUP,
            app_name=self.settings.app_name,
            message=message_markup(message), replaces=self._replaces_note(invite, words),
            link=fragment(APP_LINK, words, uri=uri), qr=Markup(qr_svg(uri)), secret=group_secret(invite.seed),
            invite=token, csrf=csrf, disabled=Markup(" disabled" if disabled else ""),
            otp_input=otp_input(disabled=disabled),
        )
        status, headers = (refusal.status, refusal.headers) if refusal else (200, [])
        return html_page(status, page, [*headers, *bound_cookie, *cookie])


# --- Admin page -------------------------------------------------------------
# The household's admin page, LOGIN_URL + /admin, for users in ADMIN_GROUP: every
# task is Household's (what the command line does), behind a session whose last
# code is at most ADMIN_FRESH_SECONDS old (the fresh code is a sign-in attempt, in
# the same limits), changes POSTed with a session-bound CSRF token from this origin.

ADMIN_NAV = """<nav><a href="{base}">{t[nav_people]}</a><a href="{base}/history">{t[nav_history]}</a><a href="{login}">{t[nav_your_sign_in]}</a></nav>
"""

ADMIN_FRESH = """<h1>{t[manage_household]}</h1>
<p class="sub">{t[signed_in_as]}</p>
{message}<form method="post">
<input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="action" value="fresh">
<label for="otp">{t[fresh_code_label]}</label>
{otp_input}
<button type="submit"{disabled}>{t[continue]}</button>
</form>
<p class="hint">{t[fresh_code_hint]}</p>
"""

ADMIN_NOT_ADMIN = """<h1>{t[not_an_admin]}</h1>
<p>{t[not_in_group]}</p>
<p class="hint"><a href="{login}">{t[back]}</a></p>
"""

ADMIN_HOME = """<h1>{t[manage_household]}</h1>
<p class="sub">{app_name} · {name}</p>
{nav}{message}{rows}<h2>{t[invite_someone]}</h2>
<form method="post" action="{base}">
<input type="hidden" name="csrf" value="{csrf}">
<input type="hidden" name="action" value="invite">
<label for="user">{t[user_name_label]}</label>
<input class="field" id="user" name="user" required maxlength="64" pattern="[A-Za-z0-9._@\\-]{{1,64}}"
 autocapitalize="none" autocomplete="off" spellcheck="false" placeholder="oma">
<details><summary>{t[more_fields]}</summary>
<label for="full_name">{t[full_name]}</label><input class="field" id="full_name" name="full_name" maxlength="100">
<label for="email">{t[email]}</label><input class="field" id="email" name="email" type="email" maxlength="254">
<label for="groups">{t[groups_label]}</label><input class="field" id="groups" name="groups" maxlength="1000">
<label for="hosts">{t[may_open_label]}</label>
<input class="field" id="hosts" name="hosts" placeholder="jellyfin.example.com *.media.example.com">
</details>
<button type="submit">{t[create_invitation]}</button>
</form>
"""

ADMIN_USER_ROW = """<a class="row" href="{url}"><b>{name}</b> {full_name}<br><span class="muted">{status}<br>{details}</span></a>
"""

ADMIN_USER = """<h1>{name}</h1>
<p class="sub">{full_name}</p>
{nav}{message}<p class="muted">{state}</p>
<h2>{t[who_they_are]}</h2>
<form method="post">
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="action" value="identity">
<label for="full_name">{t[full_name]}</label><input class="field" id="full_name" name="full_name" value="{full_name}" maxlength="100">
<label for="email">{t[email]}</label><input class="field" id="email" name="email" type="email" value="{email}" maxlength="254">
<label for="groups">{groups_label}</label>
<input class="field" id="groups" name="groups" value="{groups}" maxlength="1000">
<button type="submit" class="small">{t[save]}</button>
</form>
<h2>{t[what_they_may_open]}</h2>
<form method="post">
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="action" value="hosts">
<label for="hosts">{t[host_patterns_label]}</label>
<input class="field" id="hosts" name="hosts" value="{hosts}" required>
<button type="submit" class="small">{t[save]}</button>
</form>
<h2>{t[signed_in_heading]}</h2>
{sessions}<form method="post">
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="action" value="end-sessions">
<button type="submit" class="small">{t[sign_user_out_everywhere]}</button>
</form>
<h2>{t[app_tokens]}</h2>
{tokens}<details><summary>{t[new_app_token]}</summary>
<form method="post">
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="action" value="token">
<label for="label">{t[label]}</label><input class="field" id="label" name="label" required maxlength="64" placeholder="calendar">
<label for="token_hosts">{t[token_hosts_label]}</label><input class="field" id="token_hosts" name="token_hosts">
<label for="days">{t[days_label]}</label><input class="field" id="days" name="days" inputmode="numeric">
<button type="submit" class="small">{t[create_token]}</button>
</form></details>
<h2>{t[lost_phone]}</h2>
<p class="muted">{t[lost_phone_text]}</p>
<form method="post">
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="action" value="reset">
<label class="check"><input type="checkbox" name="keep_tokens" value="1"> {t[keep_tokens]}</label>
<button type="submit" class="small">{t[reset_user]}</button>
</form>
<h2>{t[delete]}</h2>
<form method="post">
<input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="action" value="delete">
<label for="confirm">{t[delete_label]}</label>
<input class="field" id="confirm" name="confirm" required autocapitalize="none" autocomplete="off" spellcheck="false">
<button type="submit" class="small danger">{t[delete_user]}</button>
</form>
<p class="hint"><a href="{history}">{t[history_of]}</a></p>
"""

ADMIN_SESSION_ROW = """<div class="row">{t[session_row]}{this}<br><span class="muted">{ip} · {agent}</span>
<form method="post"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="action" value="end-session">
<input type="hidden" name="session" value="{session}"><button type="submit" class="small">{t[end_this_session]}</button></form></div>
"""

ADMIN_TOKEN_ROW = """<div class="row"><b>{label}</b> · {t[token_hosts]}<br><span class="muted">{t[token_row]}</span>
<form method="post"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="action" value="revoke-token">
<input type="hidden" name="label" value="{label}"><button type="submit" class="small">{t[revoke]}</button></form></div>
"""

ADMIN_HISTORY = """<h1>{t[title_history]}</h1>
<p class="sub">{what}</p>
{nav}{rows}<p class="hint">{kept}{limit}</p>
"""

ADMIN_HISTORY_ROW = """<div class="row"><b>{time}</b> {user} · {event}{detail}<br><span class="muted">{by}{ip} · {device}{agent}</span></div>
"""

ADMIN_INVITATION = """<h1>{t[title_invitation]}</h1>
{nav}<p>{t[send_link]}</p>
<input class="link" readonly value="{link}" aria-label="{t[invitation_link]}">
<div class="qr">{qr}</div>
<p class="hint">{t[shown_once_link]}</p>
<a class="button" href="{user_url}">{t[done]}</a>
"""

ADMIN_TOKEN = """<h1>{t[title_token]}</h1>
{nav}<p>{t[token_text]}</p>
<p class="secret">{token}</p>
<p class="hint">{t[shown_once]}</p>
<a class="button" href="{user_url}">{t[done]}</a>
"""

ADMIN_GONE = """<h1>{t[already_shown]}</h1>
{nav}<p>{t[already_shown_text]}</p>
"""

# ?done= values a change redirects with: a fixed text each, never the value echoed.
ADMIN_DONE = {
    "identity": "done_identity",
    "hosts": "done_hosts",
    "end-sessions": "done_end_sessions",
    "end-session": "done_end_session",
    "revoke-token": "done_revoke_token",
    "delete": "done_delete",
}


def no_route(routes, path):
    """The HTTPError for a path a route table {(method, path): handler} has no handler for: 404, or
    405 with the methods it has (HEAD wherever GET is)."""
    allowed = sorted({m for m, p in routes if p == path})
    if not allowed:
        return HTTPError(404, b"Not found\n", say="not_found")
    if "GET" in allowed:
        allowed.append("HEAD")
    return HTTPError(405, b"Method not allowed\n", [("Allow", ", ".join(sorted(allowed)))], say="method_not_allowed")


class Admin:
    """GET and POST under LOGIN_URL + /admin (and /login/admin where a proxy strips a prefix): who may
    (an admin, else 403; no session: the login page and back), how fresh (a code typed at most
    ADMIN_FRESH_SECONDS ago, else the code form), then a page or a change. A new invitation link or
    app token is kept in memory, for this session only, until its one page shows it."""

    def __init__(self, settings, *, store, gate, cookies, signin, household):
        self.settings = settings
        self.store = store
        self.gate = gate
        self.cookies = cookies
        self.signin = signin
        self.household = household
        self.url = settings.login.url + ADMIN_SUFFIX  # what links and redirects use
        self.prefixes = tuple(dict.fromkeys((settings.login.path + ADMIN_SUFFIX, "/login" + ADMIN_SUFFIX)))
        self._csrf_key = derive_key(cookies.session_key, "admin-csrf")
        self._shown = {}  # id -> (session id, expires, template, values): shown once
        self._shown_lock = threading.Lock()
        self.pages = {
            ("GET", ""): self.home,
            ("POST", ""): self.invite,
            ("GET", "/user"): self.user_page,
            ("POST", "/user"): self.change,
            ("GET", "/history"): self.history,
            ("GET", "/shown"): self.shown,
        }

    def owns(self, path):
        return any(path == prefix or path.startswith(prefix + "/") for prefix in self.prefixes)

    # -- Who may, and how fresh --

    def handle(self, request):
        prefix = next(p for p in self.prefixes if request.path == p or request.path.startswith(p + "/"))
        page = request.path[len(prefix):].rstrip("/")
        method = "GET" if request.method == "HEAD" else request.method
        login_host = self.settings.login.host
        if login_host is not None and (request.origin is None or request.origin[1] != login_host):
            # A shared login host: on an app's host the page would share that app's origin, and a
            # script the app serves could drive it. It lives on the login host only.
            raise HTTPError(404, b"Not found\n", say="not_found")
        claims = self.gate.session(request)
        if claims is None:
            return self._to_login(request, method)
        rule = self.gate.view.rules.get(claims["sub"])
        if rule is None or not is_admin_rule(self.settings, rule):
            return self._not_admin(request, claims)
        handler = self.pages.get((method, page))
        if handler is None:
            raise no_route(self.pages, page)
        form = {}
        if method == "POST":
            form = self._checked_form(request, claims)
            if form.get("action") == "fresh":
                return self._fresh_code(request, claims, form)
        if not self.cookies.fresh_for(request, claims):
            return self._code_form(request, claims, None if method == "GET" else _Refused(403, "fresh_code_first"))
        actor = Actor(claims["sub"], str(request.ip), request.user_agent)
        return handler(request, claims, actor, form) if method == "POST" else handler(request, claims)

    def _to_login(self, request, method):
        """No session: sign in and come back (the admin page's own path; a POST's form is not kept)."""
        target = self._public_path(request.path) + (
            "?" + request.query_string if method == "GET" and request.query_string else "")
        location = self.settings.login.url + "?" + urllib.parse.urlencode({"next": target}, quote_via=urllib.parse.quote)
        return (303 if method == "POST" else 302), [("Location", location)], b""

    def _not_admin(self, request, claims):
        words = self.signin.languages.choose(request)
        page = render_page(words, words.say("title_not_an_admin", app_name=self.settings.app_name), ADMIN_NOT_ADMIN,
                           name=claims["sub"], group=self.settings.admin_group or words.say("no_admin_group"),
                           app_name=self.settings.app_name, login=self.settings.login.url)
        return html_page(403, page)

    def _checked_form(self, request, claims):
        """A change's form, from this origin and with this session's CSRF token; else 403."""
        if not is_same_origin(request.sec_fetch_site, request.origin_header, request.origin):
            self.signin.count(Outcome.CROSS_SITE, claims["sub"], request)
            raise HTTPError(403, b"Cross-site request refused\n", say="cross_site")
        form = request.form
        given = form.get("csrf", "").encode("utf-8")
        if not hmac.compare_digest(self._csrf(claims).encode(), given):
            self.signin.count(Outcome.CSRF, claims["sub"], request)
            raise HTTPError(403, b"This form expired: open the admin page again\n", say="admin_form_expired")
        return form

    def _csrf(self, claims):
        """Bound to the session (not to a cookie a sibling subdomain could plant), so it ends with it."""
        return _b64encode(hmac.new(self._csrf_key, session_id(claims).encode(), hashlib.sha256).digest())

    def _code_form(self, request, claims, refusal=None):
        words = self.signin.languages.choose(request)
        message, disabled = (refusal.text(words), refusal.disabled) if refusal else ("", False)
        page = render_page(
            words, words.say("title_fresh_code", app_name=self.settings.app_name), ADMIN_FRESH, name=claims["sub"],
            csrf=self._csrf(claims), message=message_markup(message),
            otp_input=otp_input(autofocus=True, disabled=disabled), disabled=Markup(" disabled" if disabled else ""),
            minutes=words.count("minutes", wait_minutes(self.settings.admin_fresh)),
        )
        status, headers = (refusal.status, refusal.headers) if refusal else (200, [])
        return html_page(status, page, headers)

    def _fresh_code(self, request, claims, form):
        """A fresh code: tried against this admin's own seed only, within the login form's limits (their
        device's own, else the client IP's and the anonymous ceiling): never a second guessing oracle."""
        name = claims["sub"]
        device = self.cookies.device(request, self.gate)
        device = device if device is not None and device["sub"] == name else None  # another user's device
        code = form.get("otp", "")

        def judge():
            users = [user for user in self.store.active_users() if user.name == name]
            found = match_code(code, self.signin._usable(users), request.now)
            if found is None:
                return Outcome.FAILURE, None
            if not self.store.accept_fresh_code(name, found[1]):
                return Outcome.REPLAY, None  # RFC 6238 §5.2: the code just used to sign in, too
            return Outcome.SUCCESS, claims

        try:
            self.signin.attempt(request, device, judge, event="fresh-code", user=name)
        except _Refused as refusal:
            return self._code_form(request, claims, refusal)
        target = self._public_path(request.path) + ("?" + request.query_string if request.query_string else "")
        return 303, [self.cookies.fresh(claims, request.now), ("Location", (self.settings.login.base or "") + target)], b""

    def _public_path(self, path):
        """An admin path as the browser addresses it (LOGIN_URL's path, whatever prefix a proxy stripped)."""
        prefix = next(p for p in self.prefixes if path == p or path.startswith(p + "/"))
        return self.settings.login.path + ADMIN_SUFFIX + path[len(prefix):]

    # -- Pages --

    def _render(self, words, title, template, status=200, **values):
        page = render_page(words, f"{title} · {self.settings.app_name}", template, wide=True,
                           nav=fragment(ADMIN_NAV, words, base=self.url, login=self.settings.login.url), **values)
        return html_page(status, page)

    @staticmethod
    def _message(request, words, error=None):
        if error is not None:
            said = words.say(error.say, **error.values) if error.say else str(error)
            return message_markup(said)
        key = ADMIN_DONE.get(request.query.get("done", ""))
        return fragment('<p class="done" role="status">{text}</p>\n', text=words.say(key)) if key else Markup("")

    @staticmethod
    def _none(words, key):
        return fragment('<p class="muted">{text}</p>\n', text=words.say(key))

    def home(self, request, claims, error=None, status=200):
        words = self.signin.languages.choose(request)
        invites = self.store.invites()
        rows = [fragment(ADMIN_USER_ROW, url=self._user_url(user.name), name=user.name,
                         full_name=user.full_name, status=self._status(words, user, invites.get(user.name), request.now),
                         details=self._details(words, user))
                for user in self.store.users()]
        return self._render(words, words.say("title_household"), ADMIN_HOME, status, app_name=self.settings.app_name,
                            name=claims["sub"], message=self._message(request, words, error),
                            rows=Markup("".join(rows)) or self._none(words, "nobody_yet"), base=self.url,
                            csrf=self._csrf(claims))

    def user_page(self, request, claims, error=None, status=200, name=None):
        name = request.query.get("name", "") if name is None else name
        user = self.store.user(name) if USER_NAME.fullmatch(name) else None
        if user is None:
            raise HTTPError(404, b"No such user\n", say="no_such_user")
        words = self.signin.languages.choose(request)
        csrf = self._csrf(claims)
        own = session_id(claims)
        when = functools.partial(page_time, words)
        sessions = [fragment(ADMIN_SESSION_ROW, words, login=when(s.created), seen=when(s.seen or s.created),
                             this=" · " + words.say("this_browser") if s.sid == own else "", ip=s.ip,
                             agent=s.agent or "-", csrf=csrf, session=short_id(s.sid))
                    for s in self.store.live_sessions(name, request.now, (self.settings.session_ttl, self.settings.session_max))]
        tokens = [fragment(ADMIN_TOKEN_ROW, words, label=t.label, hosts=t.hosts, created=when(t.created),
                           expires=when(t.expires), used=when(t.last_used), csrf=csrf)
                  for t in self.store.app_tokens(name)]
        return self._render(
            words, name, ADMIN_USER, status, name=name, full_name=user.full_name, email=user.email, groups=user.groups,
            hosts=user.hosts, groups_label=words.say("groups_admin_label", admin_group=self.settings.admin_group)
            if self.settings.admin_group else words.say("groups_label"),
            state=self._status(words, user, self.store.invites().get(name), request.now),
            message=self._message(request, words, error), csrf=csrf,
            sessions=Markup("".join(sessions)) or self._none(words, "no_live_session"),
            tokens=Markup("".join(tokens)) or self._none(words, "no_app_token"),
            history=self.url + "/history?" + urllib.parse.urlencode({"name": name}),
        )

    def history(self, request, claims):
        name = request.query.get("name") or None
        if name is not None and not USER_NAME.fullmatch(name):
            raise HTTPError(404, b"No such user\n", say="no_such_user")
        words = self.signin.languages.choose(request)
        days = self.settings.history_days
        entries = self.store.history(name, request.now - days * 86400, HISTORY_PAGE_ROWS + 1)
        rows = [fragment(ADMIN_HISTORY_ROW, time=page_time(words, e.at), user=e.user or words.say("nobody"),
                         event=words.say("event:" + e.event) if e.event in EVENTS else e.event,
                         detail=f" ({e.detail})" if e.detail else "", by=self._by(words, e.actor), ip=e.ip or "-",
                         device=words.say(f"{e.device}_device") if e.device in ("known", "new") else "-",
                         agent=f" · {e.agent}" if e.agent else "")
                for e in entries[:HISTORY_PAGE_ROWS]]
        limit = " " + words.count("history_limit", HISTORY_PAGE_ROWS) if len(entries) > HISTORY_PAGE_ROWS else ""
        return self._render(words, words.say("title_history"), ADMIN_HISTORY,
                            what=words.say("history_of_user", name=name) if name else words.say("history_everyone"),
                            rows=Markup("".join(rows)) or self._none(words, "nothing_yet"),
                            kept=words.count("history_kept", days), limit=limit)

    @staticmethod
    def _by(words, actor):
        if actor is None:
            return ""  # the person themselves
        return (words.say("by", name=actor) if actor else words.say("by_command_line")) + " · "

    def shown(self, request, claims):
        """A new link or token, once: the entry is gone after this page (a reload says so)."""
        with self._shown_lock:
            entry = self._shown.get(request.query.get("id", ""))
            if entry is not None and entry[0] == session_id(claims) and entry[1] > request.now:
                del self._shown[request.query["id"]]
            else:
                entry = None
        words = self.signin.languages.choose(request)
        if entry is None:
            return self._render(words, words.say("already_shown"), ADMIN_GONE, 410)
        _, _, template, values = entry
        title, values = values(words)
        return self._render(words, title, template, **values)

    def _keep_to_show(self, claims, now, template, values):
        """Keep what `values(words)` gives ((title, the template's values), in the language of the page
        that shows it) for the one page that shows it."""
        key = secrets.token_urlsafe(16)
        with self._shown_lock:
            for old in [k for k, entry in self._shown.items() if entry[1] <= now]:
                del self._shown[old]
            if len(self._shown) >= 100:
                self._shown.pop(next(iter(self._shown)))
            self._shown[key] = (session_id(claims), now + SHOWN_ONCE_SECONDS, template, values)
        return 303, [("Location", f"{self.url}/shown?id={key}")], b""

    @staticmethod
    def _status(words, user, invite, now):
        if user.seed:
            return words.say("last_sign_in", time=page_time(words, user.last_login))
        if invite is None or not invite_readable(invite) or invite.expires <= now:
            return words.say("invitation_expired")
        expires = page_time(words, invite.expires)
        if invite.opened:
            return words.say("invited_opened", opened=page_time(words, invite.opened), expires=expires)
        return words.say("invited", expires=expires)

    @staticmethod
    def _details(words, user):
        parts = [user.email, words.say("groups_detail", groups=user.groups) if user.groups else "",
                 words.say("may_open_detail", hosts=user.hosts)]
        return " · ".join(part for part in parts if part)

    def _user_url(self, name, done=None):
        query = {"name": name, **({"done": done} if done else {})}
        return self.url + "/user?" + urllib.parse.urlencode(query)

    # -- Changes: each one of Household's tasks --

    def invite(self, request, claims, actor, form):
        if form.get("action") != "invite":
            raise HTTPError(400, b"Unknown action\n", say="unknown_action")
        return self._invite(request, claims, actor, form.get("user", "").strip(), self.home, {
            "hosts": form.get("hosts", "").strip() or None, "full_name": form.get("full_name", "").strip() or None,
            "email": form.get("email", "").strip() or None, "groups": form.get("groups", "").strip() or None,
            "new_only": True})

    def _invite(self, request, claims, actor, name, page, fields):
        # The link's base before any change: a reset whose link cannot be shown must not happen.
        base = self.settings.login.base or "{}://{}".format(*request.origin)
        try:
            invitation = self.household.invite(name, actor, **fields)
        except (UsageError, CommandError) as error:
            return page(request, claims, error=error, status=400 if isinstance(error, UsageError) else 409)
        self.gate.refresh(request.now, force=True)
        link = f"{base}{self.settings.login.path}?invite={invitation.token}"
        qr, user_url, now = Markup(qr_svg(link)), self._user_url(name), request.now
        return self._keep_to_show(claims, now, ADMIN_INVITATION, lambda words: (
            words.say("title_invitation", name=name),
            {"name": name, "link": link, "qr": qr, "expires": human_time(invitation.expires, now, words),
             "user_url": user_url}))

    def change(self, request, claims, actor, form):
        """A change to the user the address names (?name=); a form naming another user is refused."""
        name = request.query.get("name", "")
        if "user" in form and form["user"] != name:
            raise HTTPError(400, b"The form names another user than the address\n", say="bad_request")
        action = form.get("action", "")
        try:
            if action == "reset":
                return self._invite(request, claims, actor, name, self._user_page_again(name),
                                    {"keep_tokens": form.get("keep_tokens") == "1", "reset_only": True})
            if action == "token":
                return self._token(request, claims, actor, name, form)
            done = self._apply(action, name, actor, form)
        except (UsageError, CommandError) as error:
            status = 400 if isinstance(error, UsageError) else 409
            return self._user_page_again(name)(request, claims, error=error, status=status)
        self.gate.refresh(request.now, force=True)
        if action == "delete":
            return 303, [("Location", f"{self.url}?done=delete")], b""
        return 303, [("Location", self._user_url(name, done))], b""

    def _user_page_again(self, name):
        """The user's page (or, for a user that is gone, the list) with an error message."""
        def page(request, claims, error=None, status=200):
            if self.store.user(name) is None:
                return self.home(request, claims, error=error, status=status)
            return self.user_page(request, claims, error=error, status=status, name=name)
        return page

    def _apply(self, action, name, actor, form):
        household = self.household
        if action == "identity":
            household.set_identity(name, actor, form.get("full_name", "").strip(), form.get("email", "").strip(),
                                   form.get("groups", ""))
        elif action == "hosts":
            household.set_hosts(name, form.get("hosts", ""), actor)
        elif action == "end-sessions":
            household.end_sessions(name, actor)
        elif action == "end-session":
            household.end_session(name, form.get("session", ""), actor)
        elif action == "revoke-token":
            household.revoke_token(name, form.get("label", ""), actor)
        elif action == "delete":
            if form.get("confirm", "").strip() != name:
                raise UsageError(f"Not deleted: type {name} exactly to delete them", say="type_name_to_delete",
                                 name=name)
            household.delete(name, actor)
        else:
            raise UsageError("Unknown action", say="unknown_action")
        return action

    def _token(self, request, claims, actor, name, form):
        new = self.household.create_token(name, form.get("label", "").strip(), actor,
                                          hosts=form.get("token_hosts", "").strip() or None,
                                          days=form.get("days", "").strip() or None)
        self.gate.refresh(request.now, force=True)
        user_url = self._user_url(name)
        return self._keep_to_show(claims, request.now, ADMIN_TOKEN, lambda words: (
            words.say("title_token", name=name),
            {"name": name, "label": new.label, "hosts": _hosts_text(new.hosts), "token": new.token,
             "expires": page_time(words, new.expires), "user_url": user_url}))


# --- App --------------------------------------------------------------------


class Metrics:
    """Counters and one latency histogram, rendered in Prometheus text format."""

    def __init__(self):
        self._lock = threading.Lock()
        self.verify = collections.Counter()
        self.app_tokens = collections.Counter()
        self.logins = collections.Counter()
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe_verify(self, result, decision, seconds):
        with self._lock:
            self.verify[result] += 1
            if decision.token:
                self.app_tokens[result] += 1
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds

    def count_login(self, outcome):
        with self._lock:
            self.logins[outcome.value] += 1

    def render(self, users):
        with self._lock:
            lines = [
                *_counter("forward_auth_verify_total", "Verify and auth decisions by result.",
                          ("allow", "renew", "redirect", "deny", "forbidden", "bad_token"), self.verify),
                *_counter("forward_auth_app_tokens_total", "Checks that presented an app token, by result.",
                          ("allow", "forbidden", "bad_token"), self.app_tokens),
                *_counter("forward_auth_logins_total", "Login attempts by result.",
                          ("success", "failure", "replay", "limited", "csrf", "cross-site"), self.logins),
                "# HELP forward_auth_rate_limited_total Login attempts refused by the guessing limits.",
                "# TYPE forward_auth_rate_limited_total counter",
                f"forward_auth_rate_limited_total {self.logins[Outcome.LIMITED.value]}",
                "# HELP forward_auth_users Enrolled users.",
                "# TYPE forward_auth_users gauge",
                f"forward_auth_users {users}",
                *self._histogram(),
            ]
        return ("\n".join(lines) + "\n").encode()

    def _histogram(self):
        name = "forward_auth_verify_duration_seconds"
        yield f"# HELP {name} Time to answer verify and auth."
        yield f"# TYPE {name} histogram"
        total = 0
        for bound, count in zip(LATENCY_BUCKETS + ("+Inf",), self.buckets):
            total += count
            yield f'{name}_bucket{{le="{bound}"}} {total}'
        yield f"{name}_sum {self.latency_sum:.6f}"
        yield f"{name}_count {total}"


def _counter(name, help_text, labels, counts):
    yield f"# HELP {name} {help_text}"
    yield f"# TYPE {name} counter"
    for label in labels:
        yield f'{name}{{result="{label}"}} {counts.get(label, 0)}'


class App:
    """The WSGI application: routes, the check endpoints and the one way out. Build it with make_app()."""

    def __init__(self, settings, store, clock, languages=None):
        self.settings = settings
        self.store = store
        self.clock = clock
        self.languages = languages or Languages.load()
        key = settings.jwt_secret.encode() if settings.jwt_secret else store.cookie_key()
        self.trust = Trust(settings.trust_proxy)
        self.limiter = RateLimiter(
            settings.max_login_attempts, settings.rate_limit_window, settings.global_max_failures, clock=clock
        )
        self.metrics = Metrics()
        self.gate = Gate(store, key, settings.cookie_name, settings.session_ttl, settings.session_max,
                         settings.history_days)
        self.gate.refresh(clock(), force=True)
        self._people_side(key)
        self.basic_auth_hosts = HostList(settings.basic_auth_hosts)
        self.forbidden_log = Throttle()
        self.bad_token_log = Throttle()
        self.cookie_reach_log = Throttle()
        login = settings.login
        self.routes = {
            ("*", "/verify"): self.verify,
            ("*", "/auth"): self.auth,
            ("GET", "/login"): self.login_page,
            ("POST", "/login"): self.login,
            ("GET", "/logout"): self.logout,
            ("POST", "/logout"): self.logout,
            ("GET", "/health"): self.health,
            ("GET", "/metrics"): self.metrics_page,
            ("GET", "/"): self.home,
            # LOGIN_URL's own paths (/sso/login, /sso/logout) where the proxy passes them unchanged.
            ("GET", login.path): self.login_page,
            ("POST", login.path): self.login,
            ("GET", login.logout_path): self.logout,
            ("POST", login.logout_path): self.logout,
        }

    def _people_side(self, key):
        """What people see and do: cookies, sign-in, invitations, the history and notices, the admin page."""
        settings, store = self.settings, self.store
        self.cookies = Cookies(settings, key)
        self.notifier = Notifier(settings.notify_url, clock=self.clock)
        self.journal = Journal(store, self.notifier, settings.app_name)
        self.signin = SignIn(
            settings, store=store, gate=self.gate, cookies=self.cookies, limiter=self.limiter, metrics=self.metrics,
            journal=self.journal, languages=self.languages,
        )
        self.enrolment = Enrolment(settings, store=store, cookies=self.cookies, signin=self.signin)
        self.household = Household(settings, store, self.journal, self.clock)
        self.admin = Admin(settings, store=store, gate=self.gate, cookies=self.cookies, signin=self.signin,
                           household=self.household)

    def refresh(self, now, force=False):
        self.gate.refresh(now, force)

    # -- WSGI entry: every response leaves through _respond --

    def __call__(self, environ, start_response):
        request = Request(environ, self.trust, self.clock())
        try:
            handler = self._route(request.method, request.path)
            status, headers, body = handler(request)
        except HTTPError as error:
            status, headers, body = self._error(request, error)
        except (KeyboardInterrupt, SystemExit):
            raise
        except sqlite3.Error as error:
            log.warning("database error: %s", error)
            status, headers, body = self._error(request, HTTPError(
                503, b"Database unavailable\n", [("Retry-After", "5")], say="database_unavailable"))
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.path[:200])
            status, headers, body = self._error(request, HTTPError(500, b"Internal error\n", say="internal_error"))
        try:
            return self._respond(start_response, status, headers, body, request.method == "HEAD")
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception:  # a header the server refused: fail closed, never a traceback
            log.exception("cannot send the answer to %s %s", request.method, request.path[:200])
            return self._respond(start_response, 500, [], b"Internal error\n", False)

    def _error(self, request, error):
        """An HTTPError as the answer: for a browser, a page in its language where the error says what
        to tell a person; for anything else its plain body."""
        answer = error.status, error.headers, error.body
        if error.say is None or not request.reads_html:
            return answer
        try:
            words = self.languages.choose(request)
            page = render_page(words, f"{words.say('error')} · {self.settings.app_name}", ERROR_PAGE,
                               text=words.say(error.say), login=self.settings.login.url)
        except Exception:  # the plain answer rather than none
            log.exception("cannot render the error page")
            return answer
        return error.status, [*page_headers(page), *error.headers], bytes(page)

    def _route(self, method, path):
        handler = self.routes.get(("*", path)) or self.routes.get(("GET" if method == "HEAD" else method, path))
        if handler is not None:
            return handler
        if self.admin.owns(path):  # every address under it: the Admin answers who may first
            return self.admin.handle
        raise no_route(self.routes, path)

    @staticmethod
    def _respond(start_response, status, headers, body, head):
        if status == 200 and not body:
            # The allow answer to the proxy: nothing a browser renders, so no
            # page headers; each header costs waitress time on the hot path.
            start_response("200 OK", [*headers, *EMPTY_BODY])
            return [b""]
        headers = list(headers)
        if not any(name == "Content-Type" for name, _ in headers):
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
        headers.append(("Content-Length", str(len(body))))
        start_response(STATUS_LINES.get(status, f"{status} Unknown"), headers + SECURITY_HEADERS)
        return [b"" if head else body]

    # -- Check endpoints: the Gate decides, these say it in each proxy's terms --

    def verify(self, request):
        """Caddy/Traefik: 200 + Remote-User; 403; a 302 to the login page for a browser, else 401."""
        return self._check(request, self._verify_denial)

    def auth(self, request):
        """nginx auth_request: 200 + Remote-User; 403; else 401 with the absolute login URL in Location."""
        return self._check(request, self._auth_denial)

    def _check(self, request, denial):
        """Decide, answer, and time and count the decision: the one place for both endpoints."""
        started = time.perf_counter()
        if request.target_mentions(ADMIN_SUFFIX) and self._for_the_admin_page(request):
            self.metrics.observe_verify("forbidden", DENIED, time.perf_counter() - started)
            return 403, [], b"This address is forward-auth's admin page, not an app's\n"
        decision = self.gate.decide(request)
        verdict = decision.verdict
        result = verdict.value
        if verdict is Verdict.ALLOW:
            # All four identity headers always set, so a client's own copy never passes.
            answer = (200, decision.headers, b"")
        elif verdict is Verdict.RENEW:
            answer = self._renew(request)
        elif verdict is Verdict.FORBIDDEN:
            answer = self._forbidden(request, decision)
        elif verdict is Verdict.BAD_TOKEN:
            answer = self._bad_token(request, decision)
        else:
            result, answer = denial(request)
        self.metrics.observe_verify(result, decision, time.perf_counter() - started)
        return answer

    def _for_the_admin_page(self, request):
        """A check for an address of the admin page: its raw path is the admin page's or under it (as a
        browser matches the admin cookie's Path), on the login host. The proxy routed it to an app: Caddy
        and nginx match `/login/admin/..%2f..%2fx` as the cleaned `/x`, which the browser sends with
        the admin cookie. Refused, whoever asks, so no app behind ever gets the cookie's request."""
        url = request.original_url
        if url is None:
            return False
        parts = urllib.parse.urlsplit(url)
        if self.settings.login.host is not None and request.original_host[0] != split_host(
                self.settings.login.host)[0]:
            return False  # another host's /login/admin is that app's own path
        return any(parts.path == prefix or parts.path.startswith(prefix + "/") for prefix in self.admin.prefixes)

    def _verify_denial(self, request):
        if not request.wants_html:
            return "deny", self._unauthorized(request)
        if request.original_problem:
            raise HTTPError(400, b"Bad forwarded URL\n", say="bad_forwarded")  # refused, never echoed
        return "redirect", (302, [("Location", self.login_location(request))], b"")

    def _auth_denial(self, request):
        # Never a redirect status and never 400: nginx turns both into a 500.
        status, headers, body = self._unauthorized(request) if not request.wants_html else (401, [], b"Unauthorized\n")
        return "deny", (status, [("Location", self._nginx_login_location(request)), *headers], body)

    def _renew(self, request):
        """A browser navigation whose session is past half its idle lifetime goes once through the
        login host, which issues the renewed cookie: no proxy has to pass a Set-Cookie from the check."""
        location = self.login_location(request, renew=True)
        if request.path == "/auth":
            return 401, [("Location", location)], b"Unauthorized\n"
        return 302, [("Location", location)], b""

    def _unauthorized(self, request):
        """401; with a Basic challenge on BASIC_AUTH_HOSTS for a client that sent no credential, or
        Basic credentials whose password is no app token (a saved password from before: RFC 9110
        §15.5.2, a 401 carries the challenge, or the client never asks again), so CalDAV/WebDAV
        clients ask for NAME:TOKEN. An app's own Bearer credential is left alone."""
        host = request.original_host
        authorization = request.authorization
        if (
            self.settings.basic_auth_hosts
            and host is not None
            and (authorization is None or authorization.lstrip()[:6].lower() == "basic ")
            and not request.cookie_values(self.settings.cookie_name)
            and self.basic_auth_hosts.matches(*host)
        ):
            return 401, [self._basic_challenge()], b"Unauthorized\n"
        return 401, [], b"Unauthorized\n"

    def _basic_challenge(self):
        realm = self.settings.app_name.replace("\\", "").replace('"', "")
        return ("WWW-Authenticate", f'Basic realm="{realm}"')

    def login_location(self, request, renew=False):
        """LOGIN_URL?next=<original URL>; a relative LOGIN_URL on the original URL's scheme and host
        (Traefik 3 resolves a relative Location against forward-auth's own address), else relative."""
        login = self.settings.login
        query = [("renew", "1")] if renew else []
        if request.original_url:
            query.append(("next", request.original_url))
            if login.base is not None:
                self._warn_if_the_cookie_cannot_follow(request)
        location = login.url + ("?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe="") if query else "")
        if login.base is None and request.original_base:
            return request.original_base + location
        return location

    def _warn_if_the_cookie_cannot_follow(self, request):
        """Once a minute in all: a browser sent to a login host whose cookie will not reach the
        host it came from (COOKIE_DOMAIN missing or too narrow) signs in and is sent back to the
        login page; the log says so and names the fix."""
        name = request.original_host and request.original_host[0]
        warning = name and cookie_reach_warning(self.settings, name)
        # One key for them all: a stranger naming a new host each time must not flood the log.
        if warning and self.cookie_reach_log.due("cookie-reach", request.now):
            log.warning("%s", warning)

    def _nginx_login_location(self, request):
        """The login URL for nginx, always absolute: nginx treats a relative Location as an internal redirect."""
        location = self.login_location(request)
        if not location.startswith("/"):
            return location
        # No usable original URL: this request's own Host, which nginx sets, never
        # a client's X-Forwarded-Host that nginx passed through.
        try:
            scheme, host = request_origin(request.origin[0] if request.origin else "http", request.own_host)
        except ValueError:
            return location
        return f"{scheme}://{host}{location}"

    def _forbidden(self, request, decision):
        # Once a minute per user and host name: a port in Host does not make a new line.
        if self.forbidden_log.due((decision.user, decision.host), request.now):
            log.info("forbidden user=%s host=%s ip=%s", decision.user, decision.host or "-", request.ip)
        if request.path == "/verify" and request.wants_html:
            original = request.original_url
            query = "?" + urllib.parse.urlencode({"next": original}, quote_via=urllib.parse.quote) if original else ""
            words = self.languages.choose(request)
            page = render_page(
                words, words.say("title_not_allowed", app_name=self.settings.app_name), FORBIDDEN_PAGE,
                name=decision.user, host=decision.host or words.say("this_address"),
                logout=self.signin.logout_url() + query,
            )
            return html_page(403, page)
        return 403, [], b""

    def _bad_token(self, request, decision):
        if self.bad_token_log.due(str(request.ip), request.now):
            log.info("app-token result=refused ip=%s", request.ip)  # never the token
        if not decision.basic:
            return 401, [], b"Unauthorized\n"
        return 401, [self._basic_challenge()], b"Unauthorized\n"

    # -- Login and logout --

    def login_page(self, request):
        login = self.settings.login
        if login.base and request.origin is not None and request.origin[1] != login.host:
            # An app host's own /login (an old relative link, a bookmark; every shipped config routes
            # it): the login page, its cookies and the admin page live on the login host alone. A
            # relative `next` meant this host: say so, or the sign-in lands on the login host's.
            fields = dict(request.query)
            if fields.get("next", "").startswith("/") and not fields["next"].startswith("//"):
                fields["next"] = f"{request.origin[0]}://{request.origin[1]}{fields['next']}"
            query = urllib.parse.urlencode(fields, quote_via=urllib.parse.quote, safe="")
            return 302, [("Location", login.url + ("?" + query if query else ""))], b""
        if "invite" in request.query:
            status, headers, body = self.enrolment.page(request, request.query["invite"])
        else:
            status, headers, body = self.signin.page(request)
        picked = self.languages.picked(request)
        if picked is not None:  # the picker's link: remember it (only ever a shipped tag, never the value sent)
            headers = [*headers, self.cookies.language(picked.tag)]
        return status, headers, body

    def login(self, request):
        form = request.form
        if "invite" in form:
            return self.enrolment.submit(request, form)
        return self.signin.submit(request, form)

    def logout(self, request):
        """End this session (with all=1 and a CSRF token, every session of its user); always expire the cookie."""
        if is_cross_site(request.sec_fetch_site, request.origin_header, request.origin):
            raise HTTPError(403, b"Cross-site logout refused\n", say="cross_site")
        form = request.form if request.method == "POST" and request.has_form else {}
        everywhere = form.get("all") == "1"
        if (everywhere or "csrf" in form) and not self.cookies.csrf_valid(request, form.get("csrf", "")):
            raise HTTPError(403, b"This form expired; sign out again\n", say="logout_form_expired")
        claims = self.gate.session(request)
        if claims is not None:
            self._end_session(request, claims, everywhere)
        elif (replaced := self.gate.ended_session(request)) is not None:
            # A cookie a renewal replaced (another tab, or a thief who renewed a copy): the session
            # id outlives its tokens, so this sign-out ends the renewed session too. One past a
            # lowered lifetime is revoked itself, until its own expiry.
            self.gate.revoke(replaced["jti"], replaced["exp"])
            try:
                self.store.end_session(session_id(replaced))
            except sqlite3.Error as error:  # the cookie is expired all the same
                log.warning("a session renewed away from this cookie could not be ended: %s", error)
            self.gate.refresh(request.now, force=True)
            log.info("logout user=%s everywhere=no ip=%s (with a replaced cookie)", replaced["sub"], request.ip)
        # With `next` (the refusal page's "sign in as someone else"), the login page returns there.
        try:
            target = self.signin.safe_next(request, request.query.get("next", ""))
        except HTTPError:  # no usable host to judge `next` by: the cookie is expired all the same
            target = "/"
        query = "?" + urllib.parse.urlencode({"next": target}, quote_via=urllib.parse.quote) if target != "/" else ""
        return 302, [self.cookies.expired_session(), self.cookies.expired_fresh(),
                     ("Location", self.settings.login.url + query)], b""

    def _end_session(self, request, claims, everywhere):
        self.gate.revoke(claims["jti"], claims["exp"])
        try:  # after the token itself: a renewal that raced this logout is ended too
            self.store.end_session(session_id(claims))
        except sqlite3.Error as error:
            log.warning("a renewal of this session could not be looked up: %s", error)
        if everywhere:
            try:
                self.store.end_sessions(claims["sub"], request.now)
            except sqlite3.Error as error:
                log.warning("sign out everywhere failed, this session is ended: %s", error)
        self.gate.refresh(request.now, force=True)
        log.info("logout user=%s everywhere=%s ip=%s", claims["sub"], "yes" if everywhere else "no", request.ip)
        self.journal.record("sign-out-everywhere" if everywhere else "sign-out", claims["sub"], request.now,
                            ip=str(request.ip), agent=request.user_agent)

    # -- Health, metrics --

    def home(self, request):
        """The login host's own /, which the shipped shared-login configs route here: the login page
        (the signed-in page for a session), never a 404 as the first screen a new member sees."""
        return 302, [("Location", self.settings.login.url)], b""

    def health(self, request):
        headers = [("Content-Type", "application/json")]
        try:
            self.store.ping()
            if not os.path.exists(self.store.path):
                raise sqlite3.OperationalError("database file is gone")
        except sqlite3.Error:
            return 503, headers, b'{"status":"unavailable"}'
        return 200, headers, b'{"status":"ok"}'

    def metrics_page(self, request):
        self.gate.refresh(request.now)
        body = self.metrics.render(self.gate.user_count())
        return 200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")], body


def make_app(settings, *, store=None, clock=time.time, languages=None):
    """The WSGI app for `settings`; tests pass their own store, clock and languages."""
    return App(settings, store or Store(settings.db_path, KeySource.of(settings), hold="shared"), clock, languages)


def __getattr__(name):
    """`forward_auth:app` for any WSGI server, built from the environment on first use."""
    if name == "app":
        globals()["app"] = make_app(Settings.from_env(os.environ))
        return globals()["app"]
    raise AttributeError(name)


# --- CLI --------------------------------------------------------------------


HALF_BLOCKS = {(True, True): "\u2588", (True, False): "\u2580", (False, True): "\u2584", (False, False): " "}


def print_enrolment(name, seed, app_name, out=None):
    """The enrolment block: what to do, the secret in groups of four, the otpauth URL, a QR code."""
    out = out or sys.stdout
    uri = enrolment_uri(seed, name, app_name)
    out.write(
        f"\nUser: {name}\nScan the QR code with an authenticator app, or type the secret; "
        f"the app will show it as {app_name!r} (APP_NAME).\n"
        f"Secret: {group_secret(seed)}\nOTPAuth URL: {uri}\n"
    )
    out.write(draw_qr(uri, colours=out.isatty()))
    out.write("\n")
    out.flush()


def draw_qr(text, colours):
    """`text` as a QR code in half blocks, two module rows per line.

    With `colours`, dark modules are drawn black on white whatever the
    terminal's own colours, so light and dark terminals both scan. Without
    (a pipe, the journal), light modules are the blocks, which scans on the
    dark background most terminals and log viewers have. A quiet zone of two
    modules (ISO 18004 asks for four; readers cope) keeps a typical otpauth
    URL within 24 terminal rows.
    """
    import segno  # only here: the serving process does not carry its ~4 MB

    rows = [[bool(module) for module in row] for row in segno.make(text, error="m").matrix_iter(border=2)]
    rows.append([False] * len(rows[0]))  # an even number of rows; the quiet zone is light
    lines = []
    for top, bottom in zip(rows[0::2], rows[1::2]):
        if colours:
            lines.append("\x1b[30;47m" + "".join(HALF_BLOCKS[pair] for pair in zip(top, bottom)) + "\x1b[0m")
        else:
            lines.append("".join(HALF_BLOCKS[(not a, not b)] for a, b in zip(top, bottom)))
    return "\n".join(lines) + "\n"


def next_free_name(store):
    taken = {user.name for user in store.users()}
    if "user" not in taken:
        return "user"
    return next(f"user{n}" for n in range(2, len(taken) + 3) if f"user{n}" not in taken)


class CLI:
    """What a command works with: the settings, the clock, and the database, opened on first use
    (so that a usage error is reported before a missing database)."""

    def __init__(self, settings, creates_database=False, clock=time.time):
        self.settings = settings
        self.clock = clock
        self._creates = creates_database
        self._store = None

    @property
    def store(self):
        return self.open()

    def open(self, hold="shared"):
        """The database, its storage key checked first (a wrong key stops every command). Held
        shared, as a server holds it: a -rekey must not run while a command seals a new seed
        under the key it replaces (`hold`: see hold_database)."""
        if self._store is None:
            if not self._creates:
                _require_database(self.settings.db_path)
            self._store = Store(self.settings.db_path, KeySource.of(self.settings), hold=hold)
        return self._store

    @functools.cached_property
    def notifier(self):
        return Notifier(self.settings.notify_url, clock=self.clock)

    @property
    def household(self):
        journal = Journal(self.store, self.notifier, self.settings.app_name)
        return Household(self.settings, self.store, journal, self.clock)

    def close(self):
        if "notifier" in self.__dict__ and not self.notifier.drain(NOTIFY_TIMEOUT_SECONDS + 1):
            print("note: a notice to NOTIFY_URL could not be sent in time", file=sys.stderr)
        if self._store is not None:
            self._store.close()

    def require_user(self, name):
        return self.household.require_user(name)


def cmd_generate(cli, name=None):
    if name is not None:
        _checked_name(name)
    store = cli.store
    name = next_free_name(store) if name is None else name
    seed = new_seed()
    if not store.add_user(name, seed, cli.clock()):
        raise CommandError(f"user {name!r} already exists")
    print_enrolment(name, seed, cli.settings.app_name)


def cmd_invite(cli, name, url=None, keep_tokens=None, hosts=None, full_name=None, email=None, groups=None):
    _checked_name(name)
    asked_base = _url_base(url)
    _checked_identity(full_name, email, groups)  # usage errors before the database is opened
    if hosts is not None:
        _pattern_list(hosts)
    login = _links_login(cli)
    link_base = _invite_base(login, asked_base, url)
    invitation = cli.household.invite(name, COMMAND_LINE, hosts=hosts, full_name=full_name, email=email,
                                      groups=groups, keep_tokens=keep_tokens)
    path = login.path
    tokens = "app tokens are kept (--keep-tokens)" if keep_tokens else "so did their app tokens (--keep-tokens keeps them)"
    what = "a new user, who can sign in once the link is used" if invitation.new else (
        f"their old authenticator and every session stopped working now, {tokens}; their hosts are kept")
    print(f"Invitation for {name}: {what}.")
    print(f"Link: {link_base}{path}?invite={invitation.token}")
    print(f"Expires: {format_time(invitation.expires)} (in {_duration(cli.settings.invite_ttl)}); it works once.")
    if not link_base:
        print("Open it on the address of any protected app, e.g. https://app.example.com" + path + "?invite=…")
    user = cli.store.user(name)
    print(shown(f"{name}: hosts {user.hosts}, name {user.full_name or '-'}, email {user.email or '-'}, "
                f"groups {user.groups or '-'}"))
    print(f"Send it to {name} directly (a message to them, not a group): it shows the setup code to the first "
          "browser that opens it, and only to that one. -list shows when it was opened.")


def _url_base(url):
    """scheme://host of --url (None without it); UsageError for anything else."""
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url.strip())
    host = normalise_host(parts.netloc, parts.scheme) if parts.scheme in DEFAULT_PORTS else None
    if host is None or "@" in parts.netloc or parts.path.strip("/") or parts.query:
        raise UsageError(f"--url {url!r}: expected https://host (the address of a protected app)")
    return f"{parts.scheme}://{host}"


def _links_login(cli):
    """The LoginURL the links this command prints must use: the running server's, as it recorded it
    at its start (the CLI often runs with DB_PATH alone, where LOGIN_URL is the default /login and a
    link would lead to an app host that does not route it), else this environment's."""
    recorded = cli.store.recorded("login_url")
    try:
        login = login_url_of(as_login_url(recorded)) if recorded is not None else None
    except ValueError:  # not written by a server of ours: this environment's
        login = None
    if login is None or login.url == cli.settings.login.url:
        return cli.settings.login
    if cli.settings.login.base:  # two absolute LOGIN_URLs: which one the proxy routes is not ours to guess
        raise UsageError(f"LOGIN_URL here is {cli.settings.login.url}, the running server's is "
                         f"{shown(login.url)} (recorded at its start): run this with the server's settings, or "
                         "restart the server with the new LOGIN_URL first")
    return login


def _invite_base(login, asked_base, url):
    """scheme://host the link starts with: an absolute LOGIN_URL's, else --url's, else '' (relative).
    A --url that an absolute LOGIN_URL contradicts is refused, not silently ignored."""
    if login.base:
        if asked_base is not None and asked_base != login.base:
            raise UsageError(f"--url {url!r} is not where the login page is: LOGIN_URL is {login.url}, so links "
                             f"start with {login.base}; leave --url out")
        return login.base
    return asked_base or ""


def _duration(seconds):
    """72 h as "3 days", 3600 s as "1 hour", else minutes (rounded up)."""
    for unit, size, least in (("day", 86400, 3), ("hour", 3600, 1)):
        if seconds % size == 0 and seconds >= size * least:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return ENGLISH_WORDS.count("minutes", wait_minutes(seconds))


def cmd_list(cli):
    users = cli.store.users()
    if not users:
        print("no users")
    invites = cli.store.invites()
    for user in users:
        print("\t".join(shown(column) for column in _user_columns(user, invites.get(user.name), cli.clock())))


def _user_columns(user, invite, now):
    if user.seed:
        columns = [user.name, f"created {format_time(user.created)}", f"last login {format_time(user.last_login)}"]
    elif invite is not None and not invite_readable(invite):
        columns = [user.name, "pending (invitation unreadable: make a new one with -invite)"]
    else:
        opened = f"opened {format_time(invite.opened)}, " if invite and invite.opened else ""
        ends = "expired" if invite is None or invite.expires <= now else f"expires {format_time(invite.expires)}"
        columns = [user.name, f"pending ({opened}invite {ends})"]
    columns.append(f"hosts {user.hosts}")
    for label, value in (("name", user.full_name), ("email", user.email), ("groups", user.groups)):
        if value:
            columns.append(f"{label} {value}")
    return columns


def cmd_user(cli, name, full_name=None, email=None, groups=None):
    """Set who NAME is for the apps behind; a flag given replaces that field, an empty value clears it."""
    _checked_name(name)
    _checked_identity(full_name, email, groups)
    try:
        user = cli.household.set_identity(name, COMMAND_LINE, full_name, email, groups)
    except UsageError as error:
        if "at least one" in str(error):
            raise UsageError("-user needs at least one of --name, --email, --groups") from None
        raise
    print(shown(f"{name}: name {user.full_name or '-'}, email {user.email or '-'}, groups {user.groups or '-'} "
                "(the apps see it within a second)"))


def cmd_allow(cli, name, *raw):
    _checked_name(name)
    if not raw:
        raise UsageError("-allow needs a NAME and at least one PATTERN (* for every host)")
    patterns = _patterns(raw)
    cli.household.set_hosts(name, patterns, COMMAND_LINE)
    print(f"{name} may open: {_hosts_text(patterns)} (takes effect within a second)")


def cmd_token(cli, name, label, hosts=None, days=None):
    _checked_name(name)
    _checked_name(label, "label")
    if hosts is not None:
        _patterns(hosts.split(","))  # a malformed pattern is a usage error before anything is looked up
    new = cli.household.create_token(name, label, COMMAND_LINE, hosts=hosts, days=days)
    for note in new.notes:
        print(f"note: {note}", file=sys.stderr)
    print(new.token)
    ends = format_time(new.expires) if new.expires else "never"
    print(f"App token {label!r} for {name} (hosts {_hosts_text(new.hosts)}, expires {ends}). "
          "It is shown only now: store it where the script reads it.", file=sys.stderr)


def cmd_tokens(cli, name=None):
    if name is not None:
        cli.require_user(name)
    tokens = cli.store.app_tokens(name)
    if not tokens:
        print("no app tokens")
    for t in tokens:
        expires = format_time(t.expires) if t.expires else "never"
        columns = (t.user, t.label, f"hosts {t.hosts}", f"created {format_time(t.created)}", f"expires {expires}",
                   f"last used {format_time(t.last_used)}")
        print("\t".join(shown(column) for column in columns))


def cmd_revoke_token(cli, name, label):
    cli.household.revoke_token(name, label, COMMAND_LINE)
    print(f"deleted {name}'s token {label!r}: refused within a second")


def cmd_sessions(cli, name=None):
    if name is not None:
        cli.require_user(name)
    sessions = cli.store.live_sessions(name, cli.clock())
    if not sessions:
        print("no live sessions")
        return
    print("\t".join(SESSION_COLUMNS))
    for s in sessions:
        columns = (short_id(s.sid), s.user, format_time(s.created), format_time(s.seen or s.created), s.ip,
                   format_time(s.expires), s.agent)
        print("\t".join(shown(column) for column in columns))


SESSION_COLUMNS = ("id", "user", "login", "last seen", "ip", "expires", "user agent")


def cmd_logout(cli, name, session=None):
    if session is not None:
        ended = cli.household.end_session(name, session, COMMAND_LINE)
        print(f"ended {name}'s session {short_id(ended.sid)} (from {shown(ended.ip)}) within a second; their "
              "other sessions go on")
        return
    cli.household.end_sessions(name, COMMAND_LINE)
    print(f"ended every session of {name} (within a second); they can sign in again")


def cmd_revoke(cli, name):
    cli.household.delete(name, COMMAND_LINE)
    print(f"revoked {name}: their sessions and app tokens stop working within a second")


def cmd_history(cli, name=None, days=None):
    if name is not None:
        _checked_name(name)
    try:
        days = cli.settings.history_days if days is None else _as_int(days, 1, 3650)
    except ValueError as error:
        raise UsageError(f"--days: {error}") from None
    entries = cli.store.history(name, cli.clock() - days * 86400)
    if not entries:
        print(f"nothing in the last {days} days")
        return
    print("\t".join(HISTORY_COLUMNS))
    for e in entries:
        columns = (format_time(e.at), e.event, e.user or "-", "-" if e.actor is None else (e.actor or "command line"),
                   e.ip or "-", e.device or "-", e.detail or "-", e.agent or "-")
        print("\t".join(shown(column) for column in columns))


HISTORY_COLUMNS = ("time", "event", "user", "by", "ip", "device", "detail", "user agent")


def cmd_backup(cli, destination):
    if os.path.lexists(destination):
        raise CommandError(f"{destination} exists; not overwriting it")
    try:
        cli.store.backup(destination)
    except FileExistsError:
        raise CommandError(f"{destination} exists; not overwriting it") from None
    except OSError as error:
        raise CommandError(f"cannot write {destination}: {error.strerror}") from None
    print(f"backup written to {destination}")
    print(f"Its seeds are sealed under the storage key with fingerprint {cli.store.key.fingerprint}: the backup is "
          f"useless without that key ({cli.store.key.source}). Keep the key apart from the backup.")


def cmd_rekey(cli, new_key_file):
    """Seal everything under the key in NEW_KEY_FILE; the server must be stopped."""
    material = read_key_file(new_key_file, f"the new key file {new_key_file}")
    new = StorageKey(material, new_key_file)
    store = cli.open(hold="exclusive")
    old = store.key
    if new.fingerprint == old.fingerprint:
        raise CommandError(f"{new_key_file} holds the key in use (fingerprint {old.fingerprint}): make a new one "
                           "with head -c 32 /dev/urandom")
    keys = KeySource.of(cli.settings)
    if keys.staged:  # written before the database changes, renamed over the old key file after
        keys.stage(material)
    stuck, scrubbed = store.rekey(new)
    if keys.staged:
        keys.replace_with_staged()
    print(f"{cli.settings.db_path}: every seed is now sealed under key {new.fingerprint} (was {old.fingerprint}); "
          f"backups made before now still need the old key")
    if keys.staged:
        print(f"{keys.key_file} now holds the new key: keep {new_key_file} apart from the backups as its copy, "
              "or delete it")
    else:
        print(f"now give the server the new key before starting it: {cli.settings.storage_key_source} must hold what "
              f"{new_key_file} holds")
    if cli.settings.jwt_secret is None:
        print("the cookie key was renewed with it: every session and device cookie has ended, so everyone signs in "
              "again (JWT_SECRET keeps them across a rekey)")
    for place in stuck:
        user = shown(place.split(":", 2)[2])
        print(f"{shown(place)} did not open and was left as it was: reset {user} with -invite {user}")
    if not scrubbed:
        raise CommandError("the values sealed under the old key stay in the file's old pages while another program "
                           "reads the database: stop it, then run any command (-list) to finish")


def cmd_restore(cli, source, unsealed=None):
    """Put the backup SOURCE in place of the database (server stopped): its schema and storage key
    checked, sealed if it is from before 4.0 (--unsealed), every session it brings back ended, its
    invitations void, and read as a start reads it before it replaces anything."""
    path = cli.settings.db_path
    if not os.path.isfile(source):
        raise CommandError(f"no backup at {source}")
    created = not os.path.exists(path)
    key = KeySource.of(cli.settings)
    if created and key.key_file and not os.path.exists(key.key_file) and _sealed_backup(source):
        # Most often DB_PATH was left out (auth.db here): say that, not "the key file is missing".
        raise CommandError(f"no database at {os.path.abspath(path)} and no key file beside it: set DB_PATH to the "
                           f"service's database, or, restoring onto a new machine, put the backup's storage key at "
                           f"{os.path.abspath(key.key_file)} (or name it with STORAGE_KEY_FILE)")
    _create_private_file(path)
    held = hold_database(path, "exclusive")
    staging = path + ".restoring"
    restored = False
    try:
        _remove_database_files(staging)
        _copy_database(source, staging, unsealed)
        fingerprint, voided, tokens = _prepare_restore(cli, staging, source)
        _remove_database_files(path, keep_main=True)  # a crashed server's WAL belongs to the file replaced
        os.replace(staging, path)
        _sync_directory(path)
        restored = True
    finally:
        _remove_database_files(staging)
        os.close(held)
        if created and not restored:
            _remove_database_files(path)  # an empty file left here would get a fresh first user
    print(f"{source} restored to {path} (storage key {fingerprint}); every session it held has ended, so everyone "
          "signs in again")
    for name in voided:
        print(f"{shown(name)}'s invitation was void: send a new link with -invite {shown(name)}")
    for token in tokens:
        print(f"app token {shown(token.user)} {shown(token.label)} is back: -revoke-token it if you did not make it")
    print("Undo again what was done since the backup: users deleted or reset and app tokens revoked since then are "
          "back (-revoke, -invite, -revoke-token)")


def _sealed_backup(source):
    """Whether the backup at `source` holds values sealed under a storage key (read-only; an
    unreadable file: False, and the copy's own checks say what is wrong with it)."""
    try:
        conn = sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(source))}?mode=ro&immutable=1", uri=True)
        try:
            return SealedFile.meta(conn, "storage_check") is not None
        finally:
            conn.close()
    except sqlite3.Error:
        return False


def _prepare_restore(cli, staging, source):
    """End what the staged backup brings back and read it as a start does (the cookie key, what the
    check path loads, the users), so that nothing is put in place that a server cannot start from.
    (fingerprint, names whose invitation was void, the app tokens it holds)."""
    store = Store(staging, KeySource.of(cli.settings), shown_as=source)  # a key that does not open it: exit 2
    try:
        now = cli.clock()
        voided = store.end_what_a_backup_brought_back(now, step_at(now) + 1)  # +1: the skew a code may have had
        if cli.settings.jwt_secret is None:
            store.cookie_key()
        store.snapshot()
        store.active_users()
        return store.key.fingerprint, voided, store.app_tokens()
    except sqlite3.Error as error:
        raise CommandError(f"{source} cannot be served from ({error}): nothing restored") from None
    finally:
        store.close()


def _copy_database(source, destination, unsealed=False):
    """Copy a backup with SQLite's backup API (the source opened read-only, never changed; the -wal
    and -shm a read-only reader of a WAL file leaves beside it are removed), then check the copy,
    not the source someone may still be writing: every page and index whole (integrity_check: a
    row kept out of its index would hide a token from -tokens, or a user row from -logout), the
    schema exactly what this version's migrations make (no trigger, view or table of anyone
    else's, which would come along and run on every later write), and, from before 4.0, only
    with --unsealed."""
    leftovers = [name for name in (source + "-wal", source + "-shm") if not os.path.exists(name)]
    try:
        reader = sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(source))}?mode=ro", uri=True)
    except sqlite3.Error as error:
        raise CommandError(f"cannot read {source}: {error}") from None
    _create_private_file(destination, exclusive=True)
    writer = sqlite3.connect(destination)
    try:
        reader.backup(writer)
        _check_backup(writer, source, unsealed)
    except sqlite3.DatabaseError as error:
        raise CommandError(f"{source} is not a forward-auth database ({error})") from None
    finally:
        reader.close()
        writer.close()
        for name in leftovers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


def _check_backup(conn, source, unsealed):
    if conn.execute("PRAGMA integrity_check").fetchall() != [("ok",)]:
        raise CommandError(f"{source} is damaged (PRAGMA integrity_check)")
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if not 1 <= version <= SCHEMA_VERSION or schema_of(conn) != schema_of_version(version):
        raise CommandError(f"{source} is not a forward-auth database (its schema is not one forward-auth writes)")
    if version < SEALED_SINCE and not unsealed:
        raise CommandError(f"{source} is from before 4.0: its seeds are in the clear, and nothing shows who wrote "
                           "it. Restore it only if you made it yourself, with --unsealed")


def _remove_database_files(path, keep_main=False):
    for name in ((path + "-wal", path + "-shm") if keep_main else (path, path + "-wal", path + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def cmd_version(cli):
    print(f"forward-auth {__version__}")


# One row a command, in the order the help lists them: its flag, its arguments
# ("[X]" optional, "X..." one or more), the flags it takes, the function that runs
# it (called with the CLI, the arguments, and the flags given), whether it may
# create the database, and its help line.
Command = collections.namedtuple("Command", "flag args flags run creates help")
COMMANDS = (
    Command("-generate", ("[NAME]",), (), cmd_generate, True, "add a user and print its enrolment"),
    Command("-invite", ("NAME",), ("url", "keep-tokens", "hosts", "name", "email", "groups"), cmd_invite, True,
            "print a single-use enrolment link (new user, or reset a lost phone)"),
    Command("-list", (), (), cmd_list, False, "list users"),
    Command("-user", ("NAME",), ("name", "email", "groups"), cmd_user, False,
            "set NAME's display name, email and groups for the apps behind"),
    Command("-allow", ("NAME", "PATTERN..."), (), cmd_allow, False, "set the hosts NAME may open (* for every host)"),
    Command("-token", ("NAME", "LABEL"), ("hosts", "days"), cmd_token, False,
            "create an app token for scripts and monitors"),
    Command("-tokens", ("[NAME]",), (), cmd_tokens, False, "list app tokens"),
    Command("-revoke-token", ("NAME", "LABEL"), (), cmd_revoke_token, False, "delete an app token"),
    Command("-sessions", ("[NAME]",), (), cmd_sessions, False, "list live sessions"),
    Command("-logout", ("NAME",), ("session",), cmd_logout, False,
            "end every session of NAME, or one (--session ID from -sessions); the user stays"),
    Command("-revoke", ("NAME",), (), cmd_revoke, False, "delete a user and end their sessions"),
    Command("-history", ("[NAME]",), ("days",), cmd_history, False,
            "who signed in and what admins did, newest first"),
    Command("-backup", ("FILE",), (), cmd_backup, False, "write an online backup of the database"),
    Command("-rekey", ("NEWKEYFILE",), (), cmd_rekey, False,
            "seal every seed under a new storage key (server stopped)"),
    Command("-restore", ("FILE",), ("unsealed",), cmd_restore, True,
            "put a backup in place of the database (server stopped); ends every session it brings back"),
    Command("-version", (), (), cmd_version, False, "print the version"),
)
# --flag: (keyword of the command's function, metavar or None for a flag without a value, help).
FLAGS = {
    "url": ("url", "BASE", "the https://host the link starts with"),
    "keep-tokens": ("keep_tokens", None, "a reset keeps the user's app tokens (by default they are deleted)"),
    "unsealed": ("unsealed", None, "restore a backup from before 4.0 (seeds in the clear: only one you made)"),
    "name": ("full_name", "TEXT", "display name, sent as Remote-Name (empty clears)"),
    "email": ("email", "ADDRESS", "email, sent as Remote-Email (empty clears)"),
    "groups": ("groups", "G1,G2", "groups, sent as Remote-Groups (empty clears)"),
    "hosts": ("hosts", "PATTERN,...", "hosts the token (or the invited person) may open"),
    "days": ("days", "N", "expire after N days (-history: the last N days)"),
    "session": ("session", "ID", "the one session to end (its id from -sessions)"),
}


def build_parser():
    import argparse  # here, not at the top: serving without arguments never needs it

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise UsageError(message)

    parser = Parser(
        prog="forward_auth.py",
        description="TOTP-only forward authentication for Caddy, nginx and Traefik.",
        epilog="Without a command it serves. Settings come from environment variables (see README).",
        allow_abbrev=False,  # a typo (-generat, -log) must never run a command that changes state
    )
    commands = parser.add_mutually_exclusive_group()
    for command in COMMANDS:
        commands.add_argument(command.flag, "-" + command.flag, dest=command.flag, **_argparse_shape(command))
    for flag, (_, metavar, help_text) in FLAGS.items():
        takers = ", ".join(c.flag for c in COMMANDS if flag in c.flags)
        shape = {"metavar": metavar} if metavar else {"action": "store_const", "const": True}
        parser.add_argument("--" + flag, dest="--" + flag, help=f"with {takers}: {help_text}", **shape)
    return parser


def _argparse_shape(command):
    args = command.args
    if not args:
        return {"action": "store_const", "const": [], "help": command.help}
    if args[-1].endswith("..."):
        last = args[-1][:-3]
        return {"nargs": "+", "metavar": (" ".join(args[:-1] + (last,)), last), "help": command.help}
    if args[0].startswith("["):
        return {"nargs": "?", "const": [], "type": lambda value: [value], "metavar": args[0][1:-1],
                "help": command.help}
    return {"nargs": len(args), "metavar": args if len(args) > 1 else args[0], "help": command.help}


def parse_command(argv):
    """(Command, its arguments, {keyword: flag value}) of a command line; UsageError otherwise."""
    parser = build_parser()
    for word in argv:  # argparse matches a prefix of a single-dash option even with allow_abbrev=False
        option = word.split("=", 1)[0]
        if option.startswith("-") and len(option) > 1 and option not in parser._option_string_actions:
            raise UsageError(f"unknown option {option!r} (see -h)")
    parsed = vars(parser.parse_args(argv))
    given = [(c, parsed[c.flag]) for c in COMMANDS if parsed[c.flag] is not None]
    flags = {flag: parsed["--" + flag] for flag in FLAGS if parsed["--" + flag] is not None}
    if not given:
        raise UsageError(f"--{next(iter(flags))} needs a command that takes it (see -h)")
    command, values = given[0]
    values = values if isinstance(values, list) else [values]
    for flag in flags:
        if flag not in command.flags:
            raise UsageError(f"{command.flag} does not take --{flag}")
    return command, values, {FLAGS[flag][0]: value for flag, value in flags.items()}


def run_command(settings, command, values, flags):
    cli = CLI(settings, creates_database=command.creates)
    try:
        command.run(cli, *values, **flags)
    finally:
        cli.close()
    return 0


def _require_database(path):
    """Commands that only read or change users need the database to exist: one created here, in the
    wrong directory, would be empty and silently answer "no users"."""
    if not os.path.exists(path):
        where = os.path.abspath(path)
        relative = "" if os.path.isabs(path) else " (DB_PATH is relative to the current directory)"
        raise CommandError(f"no database at {where}{relative}: set DB_PATH to the server's database")


# --- Serve ------------------------------------------------------------------
# Running the server (waitress, logging, signals, the first start) and main(), which
# runs a command or serves.


def configure_logging(settings):
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


class _JSONFormatter(logging.Formatter):
    def format(self, record):
        message = record.getMessage()
        try:
            data = json.loads(message) if message.startswith("{") else {"message": message}
        except ValueError:
            data = {"message": message}
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname.lower()}
        entry.update(data)
        return json.dumps(entry)


SERVER_OPTIONS = {
    # The app decides whom to trust (TRUST_PROXY, CIDR lists); waitress
    # would otherwise delete X-Forwarded-* before we see them.
    "clear_untrusted_proxy_headers": False,
    "ident": "forward-auth",
    "channel_timeout": 30,  # idle keep-alive connections close after 30 s
    "connection_limit": 512,  # beyond it waitress stops accepting until some close
    "max_request_header_size": 32 * 1024,
    "max_request_body_size": 64 * 1024,  # the login form is capped at 8 KiB by the app
}


def create_server(app, settings, **overrides):
    """A waitress server for `app`, listening but not yet running; OSError naming the address."""
    import waitress.server

    # waitress warns "Task queue depth is N" whenever requests wait for a free
    # thread, which under load is most of them: it floods the journal and costs
    # 10-20 % of throughput. Queueing is normal here; THREADS sizes it. Set with
    # the server, so every server made here (the tests' too) is as quiet.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    options = {"host": settings.host, "port": settings.port, "threads": settings.threads, **SERVER_OPTIONS}
    options.update(overrides)
    try:
        return waitress.server.create_server(app, **options)
    except OSError as error:
        where = _listen_address(options["host"], options["port"])
        raise OSError(f"cannot listen on {where}: {error.strerror or error}") from None


def _listen_address(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_listen_host(host):
    """ConfigError naming HOST if it is neither an address nor a name this machine resolves."""
    import socket

    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        raise ConfigError(f"HOST: cannot resolve {host!r} (use an address such as 127.0.0.1 or ::1)") from None


def serve(settings, store, environ=None):
    configure_logging(settings)
    try:
        app = make_app(settings, store=store)
        server = create_server(app, settings)  # listening first: a start that fails changes nothing
    except BaseException:
        store.close()
        raise
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # from here on, a stop is a clean exit
    try:
        warn_near_misses(environ or {})
        _record_server_settings(store, settings)
        _warn_if_the_cookie_cannot_reach_users_hosts(store, settings)
        _first_start(store, settings, app)
        _return_freed_memory()
        where = _listen_address(settings.host, server.effective_port)
        log.info("forward-auth %s listening on http://%s", __version__, where)
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        app.gate.write_before_stopping()  # logouts held in memory, app tokens' last-used times
        app.notifier.drain(NOTIFY_TIMEOUT_SECONDS)  # a notice of the last moments still goes out
        store.close()
        log.info("stopped")
    return 0


def warn_near_misses(environ):
    """One warning line per environment variable that looks like a setting but is none
    (SECURE_COOKIE for SECURE_COOKIES): a typo must not leave a default in place unnoticed."""
    known = {name for _, name, _, _ in SETTINGS}
    known |= {name + "_FILE" for name in known}
    for variable in sorted(environ):
        if variable in known or not variable.isupper() or len(variable) < 6:
            continue
        close = [name for name in sorted(known)
                 if _edit_distance(variable, name) <= 2 or name.startswith(variable + "_")]
        if close:
            log.warning("environment variable %s is not a setting; did you mean %s?", variable, close[0])


def _edit_distance(a, b):
    """Levenshtein distance, stopping early beyond 2 (all that near misses need)."""
    if abs(len(a) - len(b)) > 2:
        return 3
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _record_server_settings(store, settings):
    """Record what the command line must judge by as this server does (Store.record_server)."""
    try:
        store.record_server(settings)
    except sqlite3.Error as error:  # the command line falls back to its own environment
        log.warning("cannot record LOGIN_URL and the session lifetimes for the command line: %s", error)


def _warn_if_the_cookie_cannot_reach_users_hosts(store, settings):
    """One line at start when a shared login host's session cookie cannot reach a host in a user's
    host list (cookie_domain_warning)."""
    patterns = {p for user in store.users() for p in (_hosts_rule(user.hosts) or ())}
    if (warning := cookie_domain_warning(settings, sorted(patterns))) is not None:
        log.warning("%s", warning)


def _first_start(store, settings, app):
    """A first user in a database that never had one; else, with no one able to log in, how to add one."""
    if not store.had_user():
        name = next_free_name(store)
        seed = new_seed()
        store.add_user(name, seed, app.clock())
        print_enrolment(name, seed, settings.app_name)
        app.refresh(app.clock(), force=True)
    elif not store.active_users():
        log.info("no users: add one with `forward_auth.py -invite NAME` (or -generate NAME at this terminal)")


def _return_freed_memory():
    """Hand the compiler's freed memory back to the OS (some of what compiling the script took).

    Python compiles this script afresh at every start (__main__ gets no .pyc)
    and glibc keeps what the compiler freed; malloc_trim returns it.
    """
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):  # not glibc: nothing to do
        pass


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None, environ=None):
    """Run the command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    try:
        command = parse_command(argv) if argv else None
    except UsageError as error:
        return _fail(error, 2)
    except SystemExit as exit_:  # -h prints help and exits 0
        return exit_.code
    if command is not None and command[0].run is cmd_version:
        cmd_version(None)
        return 0
    try:
        settings = Settings.from_env(environ)
        if command is None:
            check_listen_host(settings.host)
            return serve(settings, Store(settings.db_path, KeySource.of(settings), hold="shared"), environ)
        return run_command(settings, *command)
    except (UsageError, ConfigError) as error:
        return _fail(error, 2)
    except BrokenPipeError:
        # `-generate | head -3`: the reader has what it wanted; say nothing more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CommandError, DatabaseInUse, OSError, sqlite3.Error) as error:
        return _fail(error, 1)


def _fail(error, code):
    print(f"forward_auth: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
