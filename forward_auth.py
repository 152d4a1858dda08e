"""forward-auth: TOTP-only forward authentication for a reverse proxy.

The proxy (Caddy ``forward_auth``, nginx ``auth_request``, Traefik
``forwardAuth``) asks this service, on every request, whether the browser is
logged in: ``/verify`` (Caddy, Traefik) and ``/auth`` (nginx) answer ``200``
with ``Remote-User`` from a signed session cookie, or send the browser to
``/login``, where a person types the 6-digit code from an authenticator app.

Usage::

    python forward_auth.py                  # serve (creates a first user if none)
    python forward_auth.py -generate alice  # add a user, print secret + QR code
    python forward_auth.py -list            # name, created, last login
    python forward_auth.py -revoke alice    # delete a user, end their sessions
    python forward_auth.py -backup FILE     # consistent online copy of the database

Configuration is read from environment variables (see ``SETTINGS``), each with
a ``*_FILE`` variant for Docker/systemd secrets.

What it is not: there are no passwords, no user directory, no OAuth/OIDC and
no second factor. One factor, the TOTP code, guarded by replay protection and
guessing limits; the README gives the arithmetic.
"""

__version__ = "1.0.0"

import base64
import bisect
import collections
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
import sys
import threading
import time
import types
import urllib.parse

import pyotp

# --- Constants and errors ---------------------------------------------------

STEP = 30  # RFC 6238 §4: time step X, in seconds
DIGITS = 6  # RFC 4226 §5.3: 6-digit HOTP values
WINDOW = (-1, 0, 1)  # RFC 6238 §5.2: accept one step of clock skew either way
CODE_SHAPE = re.compile(r"[0-9]{6}", re.ASCII)  # str.isdigit() admits full-width digits
USER_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}", re.ASCII)
MAX_FORM_BYTES = 8 * 1024
MAX_QUERY_FIELDS = 32
DEVICE_COOKIE_SECONDS = 400 * 86400  # the longest Max-Age browsers keep (RFC 6265bis)
MAX_LOCKOUT_SECONDS = 86400
REFRESH_SECONDS = 0.5  # how often /verify looks for changes made by another process
TOKEN_CACHE_SIZE = 1024  # entries; at most TOKEN_CACHE_KEY_BYTES each, so 4 MB at worst
TOKEN_CACHE_KEY_BYTES = 4096
SCHEMA_VERSION = 1

HS256_HEADER = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"  # b64url('{"alg":"HS256","typ":"JWT"}')
B64URL = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)
HOST_PORT = re.compile(
    r"(?P<host>[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?", re.ASCII
)
DEFAULT_PORTS = {"http": 80, "https": 443}
LOOPBACK = ("127.0.0.0/8", "::1/128")

STATUS_LINES = {  # the statuses this service answers (http.HTTPStatus would cost an import)
    200: "200 OK",
    302: "302 Found",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    403: "403 Forbidden",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    413: "413 Content Too Large",
    415: "415 Unsupported Media Type",
    429: "429 Too Many Requests",
    500: "500 Internal Server Error",
    503: "503 Service Unavailable",
}
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class HTTPError(Exception):
    """An HTTP answer other than success, raised by a handler."""

    def __init__(self, status, body=b"", headers=()):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = list(headers)


class ConfigError(ValueError):
    """A setting with a bad value; the message names the variable."""


# --- Settings ---------------------------------------------------------------


def normalise_host(host, scheme):
    """`host[:port]` lower-cased, without a trailing dot or the scheme's default port; None if malformed."""
    match = HOST_PORT.fullmatch(host or "")
    if not match:
        return None
    name = match["host"].lower().rstrip(".")
    port = match["port"]
    if not name or ".." in name:
        return None
    if port is not None:
        if not 0 < int(port) <= 65535:
            return None
        if int(port) != DEFAULT_PORTS.get(scheme):
            return f"{name}:{int(port)}"
    return name


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
        return value
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in DEFAULT_PORTS or "@" in parts.netloc or normalise_host(parts.netloc, parts.scheme) is None:
        raise ValueError("expected /path or an absolute http(s) URL")
    if parts.query or parts.fragment:
        raise ValueError("must not carry a query or fragment")
    return value


def as_host_patterns(value):
    hosts = []
    for item in value.split(","):
        item = item.strip().lower().rstrip(".")
        if not item:
            continue
        bare = item.removeprefix("*.")
        if not HOST_PORT.fullmatch(bare):
            raise ValueError(f"{item!r} is not a host name")
        hosts.append(item)
    return tuple(hosts)


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
    ("session_ttl", "SESSION_TTL_SECONDS", "86400", as_seconds),
    ("cookie_name", "COOKIE_NAME", "auth_token", as_cookie_name),
    ("cookie_domain", "COOKIE_DOMAIN", "", as_cookie_domain),
    ("secure_cookies", "SECURE_COOKIES", "true", as_bool),
    ("same_site", "SAME_SITE", "lax", as_same_site),
    ("trust_proxy", "TRUST_PROXY", "loopback", as_networks),
    ("login_url", "LOGIN_URL", "/login", as_login_url),
    ("allowed_redirect_hosts", "ALLOWED_REDIRECT_HOSTS", "", as_host_patterns),
    ("max_login_attempts", "MAX_LOGIN_ATTEMPTS", "5", as_count),
    ("rate_limit_window", "RATE_LIMIT_WINDOW_SECONDS", "900", as_seconds),
    ("global_max_failures", "GLOBAL_MAX_FAILURES", "30", as_count),
    ("app_name", "APP_NAME", "Forward Auth", as_text),
    ("log_format", "LOG_FORMAT", "text", as_log_format),
    ("threads", "THREADS", "8", as_threads),
)


class Settings:
    """The validated configuration, frozen. Fields are SETTINGS' first column;
    defaults are its defaults, converted. Tests build Settings(port=0, ...)."""

    __slots__ = tuple(field for field, *_ in SETTINGS)

    def __init__(self, **values):
        unknown = set(values) - set(self.__slots__)
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        for field, _name, default, convert in SETTINGS:
            value = values[field] if field in values else (None if default is None else convert(default))
            object.__setattr__(self, field, value)
        if self.same_site == "None" and not self.secure_cookies:
            raise ConfigError("SAME_SITE: none needs SECURE_COOKIES=true (browsers refuse it otherwise)")
        login = urllib.parse.urlsplit(self.login_url)
        domain = (self.cookie_domain or "").lstrip(".")
        if domain and login.hostname and not (login.hostname == domain or login.hostname.endswith("." + domain)):
            # The browser would drop the session cookie the login host sets.
            raise ConfigError(f"COOKIE_DOMAIN: the login host {login.hostname} is not inside {self.cookie_domain}")

    def __setattr__(self, name, value):
        raise AttributeError("Settings are frozen")

    def __repr__(self):
        shown = (f"{f}={'<secret>' if f == 'jwt_secret' and v else repr(v)}" for f, v in self._items())
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
                raise ConfigError(f"{name}: {error}") from None
        return cls(**values)


def _read_variable(environ, name, default):
    """The value of NAME, or of the file NAME_FILE names (one trailing newline stripped)."""
    path = environ.get(name + "_FILE")
    if path is not None and name in environ:
        raise ConfigError(f"{name}: set {name} or {name}_FILE, not both")
    if path is None:
        return environ.get(name, default)
    try:
        with open(path, encoding="utf-8") as file:
            value = file.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{name}_FILE: cannot read {path!r} ({error.__class__.__name__})") from None
    return value.removesuffix("\n")


# --- Storage ----------------------------------------------------------------


User = collections.namedtuple("User", "name seed created last_login last_step")


SCHEMA = (
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
)


class Store:
    """The SQLite database: users, revoked sessions and the generated cookie key.

    One connection for queries and writes, one for noticing changes other
    processes commit (``PRAGMA data_version`` only moves for other connections).
    Each is guarded by a lock because waitress serves from several threads.
    """

    def __init__(self, path):
        self.path = path
        try:
            _create_private_file(path)
        except OSError as error:
            raise RuntimeError(f"cannot open the database {path}: {error.strerror}") from None
        self._conn = self._connect()
        self._lock = threading.Lock()
        self._migrate()
        self._watch = self._connect()
        # The watch connection is read from /verify: never let it wait long.
        self._watch.execute("PRAGMA busy_timeout = 100")
        self._watch_lock = threading.Lock()

    def _connect(self):
        conn = sqlite3.connect(self.path, timeout=5, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        # FULL: an accepted TOTP step must survive a power cut, or a code could be replayed.
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def _migrate(self):
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                (version,) = self._conn.execute("PRAGMA user_version").fetchone()
                if version > SCHEMA_VERSION:
                    raise sqlite3.DatabaseError(f"database schema {version} is newer than this program")
                if version < 1:
                    for statement in SCHEMA:
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _query(self, sql, params=()):
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _write(self, sql, params=()):
        """Run one statement in its own transaction; return the rows it changed."""
        with self._lock:
            return self._conn.execute(sql, params).rowcount

    def ping(self):
        self._query("SELECT count(*) FROM users")

    def cookie_key(self):
        """The generated HMAC key, created once by whichever process asks first."""
        self._write("INSERT OR IGNORE INTO meta VALUES ('cookie_key', ?)", (secrets.token_hex(32),))
        return bytes.fromhex(self._query("SELECT value FROM meta WHERE key = 'cookie_key'")[0][0])

    def add_user(self, name, seed, now):
        """True if added, False if the name is taken."""
        try:
            self._write("INSERT INTO users (name, seed, created) VALUES (?, ?, ?)", (name, seed, int(now)))
        except sqlite3.IntegrityError:
            return False
        return True

    def delete_user(self, name, now):
        """True if the user existed; their tokens issued until `now` stay refused."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                gone = self._conn.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 1
                if gone:
                    self._conn.execute("INSERT OR REPLACE INTO deleted VALUES (?, ?)", (name, int(now)))
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return gone

    def users(self):
        rows = self._query("SELECT name, seed, created, last_login, last_step FROM users ORDER BY created, name")
        return [User(*row) for row in rows]

    def accept_step(self, name, step, now):
        """Record a login at TOTP step `step`; False if that step or a later one was used."""
        changed = self._write(
            "UPDATE users SET last_step = ?, last_login = ? WHERE name = ? AND last_step < ?",
            (step, int(now), name, step),
        )
        return changed == 1

    def revoke(self, jti, expires):
        self._write("INSERT OR REPLACE INTO revoked VALUES (?, ?)", (jti, int(expires)))

    def purge_revoked(self, now):
        self._write("DELETE FROM revoked WHERE expires <= ?", (int(now),))

    def snapshot(self):
        """(data_version, {user names}, {deleted name: when}, {jti: expires}) read through the watch connection."""
        with self._watch_lock:
            conn = self._watch
            (version,) = conn.execute("PRAGMA data_version").fetchone()
            conn.execute("BEGIN")
            try:
                users = {name for (name,) in conn.execute("SELECT name FROM users")}
                deleted = dict(conn.execute("SELECT name, at FROM deleted"))
                revoked = dict(conn.execute("SELECT jti, expires FROM revoked"))
            finally:
                conn.execute("COMMIT")
            return version, users, deleted, revoked

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
        finally:
            target.close()

    def close(self):
        self._conn.close()
        self._watch.close()


def _create_private_file(path, exclusive=False):
    """Create `path` with mode 0600 before SQLite opens it (SQLite would use the umask)."""
    flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if exclusive else 0)
    os.close(os.open(path, flags, 0o600))


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
    if header != HS256_HEADER and not _plain_hs256_header(header):
        return None, "algorithm"
    if not B64URL.fullmatch(payload) or not B64URL.fullmatch(signature) or not hmac.compare_digest(
        signature, _signature(f"{header}.{payload}", key)
    ):
        return None, "signature"
    try:
        claims = json.loads(_b64decode(payload))
    except ValueError:
        return None, "malformed"
    if not _claims_well_formed(claims):
        return None, "claims"
    if claims["exp"] <= now:
        return None, "expired"
    return claims, None


def _plain_hs256_header(segment):
    """A header another HS256 signer may write: alg HS256, typ JWT or absent, nothing else.

    No `none`, no other alg, and no key hints (kid, jku, jwk, x5u, crit) to follow.
    """
    try:
        header = json.loads(_b64decode(segment))
    except ValueError:
        return False
    return (
        isinstance(header, dict)
        and header.get("alg") == "HS256"
        and header.get("typ", "JWT") == "JWT"
        and set(header) <= {"alg", "typ"}
    )


def _claims_well_formed(claims):
    return (
        isinstance(claims, dict)
        and isinstance(claims.get("sub"), str)
        and isinstance(claims.get("jti"), str)
        and type(claims.get("iat")) is int
        and type(claims.get("exp")) is int
    )


def new_claims(subject, now, lifetime):
    now = int(now)
    return {"sub": subject, "iat": now, "exp": now + lifetime, "jti": secrets.token_urlsafe(16)}


def derive_key(key, purpose):
    """A separate key per cookie kind, so a device cookie never passes as a session."""
    return hmac.new(key, b"forward-auth/" + purpose.encode(), hashlib.sha256).digest()


# --- TOTP -------------------------------------------------------------------


def step_at(now):
    """The RFC 6238 time step (T) for a Unix time."""
    return int(now // STEP)


def new_seed():
    return pyotp.random_base32()  # 160 bits, as RFC 4226 §4 recommends


def well_formed_code(code):
    return isinstance(code, str) and CODE_SHAPE.fullmatch(code) is not None


def match_code(code, users, now):
    """(user, step) for the first user whose code at step-1, step or step+1 is `code`, else None.

    Every user and every step is tried, so timing does not tell which matched.
    A match may still be a replay: the caller refuses steps not after `last_step`.
    """
    if not well_formed_code(code):
        return None
    given = code.encode("ascii")
    step = step_at(now)
    matches = []
    for user in users:
        totp = pyotp.TOTP(user.seed)
        for offset in WINDOW:
            if hmac.compare_digest(totp.generate_otp(step + offset).encode("ascii"), given):
                matches.append((user, step + offset))
    fresh = [(user, step) for user, step in matches if step > user.last_step]
    return (fresh or matches or [None])[0]


def enrolment_uri(seed, name, app_name):
    return pyotp.TOTP(seed).provisioning_uri(name=name, issuer_name=app_name)


# --- Rate limiter -----------------------------------------------------------


class _Bucket:
    __slots__ = ("failures", "in_flight", "last_trip", "locked_until", "lockout")

    def __init__(self):
        self.failures = []  # times of failures within the window (a list: 10,000 deques weigh 6 MB)
        self.in_flight = 0  # attempts let through and not yet decided
        self.locked_until = 0.0
        self.lockout = 0
        self.last_trip = None


class RateLimiter:
    """Failed-login counters per key (device or client IP) and one global ceiling.

    A key (or the ceiling) that reaches its limit within `window` seconds trips:
    it is locked for one window, doubled for each trip within 24 h of the last,
    up to 24 h. Clients with a device cookie are counted per device only; all
    others also share the global ceiling. Attempts in flight count toward the
    limit, so parallel guesses cannot slip past it. At most `max_keys` keys
    are kept (least recently used first out), so memory stays bounded.
    """

    def __init__(self, max_attempts, window, global_max, *, max_keys=10_000, clock=time.time):
        self.max_attempts = max_attempts
        self.window = window
        self.global_max = global_max
        self.max_keys = max_keys
        self.clock = clock
        self._buckets = collections.OrderedDict()
        self._global = _Bucket()
        self._lock = threading.Lock()

    def acquire(self, key, device=False):
        """Start an attempt: 0 if it may go ahead (then release() it), else seconds to wait."""
        now = self.clock()
        with self._lock:
            buckets = self._buckets_for(key, device)
            wait = max(self._wait(bucket, limit, now) for bucket, limit in buckets)
            if wait == 0:
                for bucket, _ in buckets:
                    bucket.in_flight += 1
            return wait

    def release(self, key, device=False, outcome="failure"):
        """End an acquired attempt: "failure" counts, "success" resets its device or IP, "undecided" neither."""
        now = self.clock()
        with self._lock:
            for bucket, limit in self._buckets_for(key, device):
                bucket.in_flight = max(0, bucket.in_flight - 1)
                if outcome == "failure":
                    self._count(bucket, limit, now)
            if outcome == "success":
                self._buckets.pop(key, None)

    def retry_after(self, key, device=False):
        """Seconds until `key` may try again; 0 when it may try now."""
        now = self.clock()
        with self._lock:
            return max(self._wait(bucket, limit, now) for bucket, limit in self._buckets_for(key, device))

    def failure(self, key, device=False):
        """Count a failure that was not acquired."""
        now = self.clock()
        with self._lock:
            for bucket, limit in self._buckets_for(key, device):
                self._count(bucket, limit, now)

    def __len__(self):
        return len(self._buckets)

    def _buckets_for(self, key, device):
        bucket = self._buckets.pop(key, None) or _Bucket()
        self._buckets[key] = bucket  # most recently used last
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        pairs = [(bucket, self.max_attempts)]
        if not device:
            pairs.append((self._global, self.global_max))
        return pairs

    def _wait(self, bucket, limit, now):
        if bucket.locked_until > now:
            # Never longer than the lockout itself, so a clock set back cannot stretch it.
            return math.ceil(min(bucket.locked_until - now, bucket.lockout))
        self._forget_old(bucket, now)
        if len(bucket.failures) + bucket.in_flight >= limit:
            return 1  # the attempts in flight may reach the limit: ask again in a second
        return 0

    def _forget_old(self, bucket, now):
        failures = bucket.failures
        if failures and failures[0] <= now - self.window:
            bucket.failures = [t for t in failures if t > now - self.window]

    def _count(self, bucket, limit, now):
        self._forget_old(bucket, now)
        bucket.failures.append(now)
        if len(bucket.failures) >= limit:
            # "Within 24 h of the last" counts from the end of the last lockout,
            # so a guesser who resumes as soon as a 24 h lockout ends stays at 24 h.
            recent = bucket.last_trip is not None and now - bucket.locked_until < MAX_LOCKOUT_SECONDS
            bucket.lockout = min(bucket.lockout * 2, MAX_LOCKOUT_SECONDS) if recent else self.window
            bucket.locked_until = now + bucket.lockout
            bucket.last_trip = now
            bucket.failures.clear()


# --- Request helpers --------------------------------------------------------


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


def client_ip(environ, trust):
    """The client's address: the peer, or from a trusted peer the right-most untrusted X-Forwarded-For hop."""
    peer = environ.get("REMOTE_ADDR", "")
    forwarded = environ.get("HTTP_X_FORWARDED_FOR")
    if not forwarded or peer not in trust:
        return str(parse_ip(peer) or peer)
    chosen = parse_ip(peer)
    for hop in reversed(forwarded.split(",")):
        ip = parse_ip(hop)
        if ip is None:
            break  # a malformed hop: nothing left of it can be believed
        chosen = ip
        if ip not in trust:
            break
    return str(chosen)


def limiter_key_for_ip(ip_text):
    """IPv6 clients are grouped by /64, since one host usually holds a whole /64."""
    ip = parse_ip(ip_text)
    if ip is not None and ip.version == 6:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return ip_text


def _has_unsafe_characters(text):
    return any(c <= " " or c == "\x7f" or c == "\\" or not c.isascii() for c in text)


def request_origin(environ, trust):
    """(scheme, host) the browser used, from trusted X-Forwarded-* or the request itself."""
    trusted = environ.get("REMOTE_ADDR", "") in trust
    scheme = environ.get("HTTP_X_FORWARDED_PROTO") if trusted else None
    host = environ.get("HTTP_X_FORWARDED_HOST") if trusted else None
    scheme = (scheme or environ.get("wsgi.url_scheme", "http")).strip().lower()
    host = host or environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
    if scheme not in DEFAULT_PORTS or "," in host or "@" in host:
        raise HTTPError(400, b"Bad forwarded scheme or host\n")
    normal = normalise_host(host.strip(), scheme)
    if normal is None:
        raise HTTPError(400, b"Bad forwarded host\n")
    return scheme, normal


def original_url(environ, trust):
    """The URL the proxy was asked for, or None when no trusted proxy told us.

    X-Original-URL (nginx) wins over X-Forwarded-Proto/Host/Uri (Caddy,
    Traefik). Anything malformed raises HTTPError(400): it is never echoed.
    """
    if environ.get("REMOTE_ADDR", "") not in trust:
        return None
    full = environ.get("HTTP_X_ORIGINAL_URL")
    if full is not None:
        return _checked_absolute_url(full)
    if "HTTP_X_FORWARDED_HOST" not in environ and "HTTP_X_FORWARDED_URI" not in environ:
        return None
    scheme, host = request_origin(environ, trust)
    uri = environ.get("HTTP_X_FORWARDED_URI", "/")
    if not uri.startswith("/") or uri.startswith("//") or _has_unsafe_characters(uri):
        raise HTTPError(400, b"Bad forwarded URI\n")
    return f"{scheme}://{host}{uri}"


def _checked_absolute_url(url):
    if _has_unsafe_characters(url):
        raise HTTPError(400, b"Bad original URL\n")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        raise HTTPError(400, b"Bad original URL\n") from None
    host = normalise_host(parts.netloc, parts.scheme) if "@" not in parts.netloc else None
    if parts.scheme not in DEFAULT_PORTS or host is None or "," in parts.netloc:
        raise HTTPError(400, b"Bad original URL\n")
    path = parts.path or "/"
    if path.startswith("//"):
        raise HTTPError(400, b"Bad original URL\n")
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{host}{path}{query}"


def host_allowed(host, login_host, settings):
    """Whether a redirect may go to `host` (normalised host[:port])."""
    if host == login_host:
        return True
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    domain = settings.cookie_domain
    if domain:
        domain = domain.lstrip(".")
        if name == domain or name.endswith("." + domain):
            return True
    for pattern in settings.allowed_redirect_hosts:
        candidate = host if ":" in pattern.lstrip("[").split("]")[-1] else name
        if pattern.startswith("*."):
            if candidate.endswith(pattern[1:]):
                return True
        elif candidate == pattern:
            return True
    return False


def safe_next(value, login_host, settings):
    """`value` re-serialised if it is a safe place to return to after login, else "/"."""
    if not value or _has_unsafe_characters(value):
        return "/"
    if value.startswith("/"):
        if value[1:2] in ("/", "\\"):
            return "/"
        parts = urllib.parse.urlsplit(value)
        return urllib.parse.urlunsplit(("", "", parts.path, parts.query, parts.fragment)) or "/"
    try:
        parts = urllib.parse.urlsplit(value)
    except ValueError:
        return "/"
    allowed_schemes = ("https",) if settings.secure_cookies else ("https", "http")
    if parts.scheme not in allowed_schemes or not parts.netloc or "@" in parts.netloc:
        return "/"
    host = normalise_host(parts.netloc, parts.scheme)
    if host is None or not host_allowed(host, login_host, settings):
        return "/"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path or "/", parts.query, parts.fragment))


def wants_html(environ, method):
    """A browser navigation: GET/HEAD, Accept absent or with text/html, not XHR."""
    if method not in ("GET", "HEAD") or "HTTP_X_REQUESTED_WITH" in environ:
        return False
    accept = environ.get("HTTP_ACCEPT")
    return accept is None or "text/html" in accept


def parse_cookies(header):
    """{name: value} for a Cookie header; the first of a repeated name wins."""
    cookies = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name not in cookies:
            cookies[name] = value.strip().strip('"')
    return cookies


def parse_form(text):
    """{name: first value} of a query string or urlencoded body; HTTPError 400 if absurd."""
    try:
        pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise HTTPError(400, b"Too many fields\n") from None
    form = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form


def _wsgi_text(raw):
    """WSGI hands us latin-1 decoded bytes; take them back as UTF-8 (U+FFFD for junk)."""
    return raw.encode("latin-1", "replace").decode("utf-8", "replace")


# --- Pages ------------------------------------------------------------------

LOGIN_CSS = """
:root{color-scheme:light dark;--bg:#f4f5f7;--card:#fff;--fg:#1d2330;--muted:#5b6475;
--line:#c9ced8;--accent:#2451c7;--accent-fg:#fff;--error:#b3261e;--error-bg:#fdecea}
@media (prefers-color-scheme:dark){:root{--bg:#111318;--card:#1c1f26;--fg:#e6e8ee;
--muted:#a2a9b8;--line:#3a404c;--accent:#7aa2ff;--accent-fg:#0b1020;--error:#ffb4ab;--error-bg:#3b1614}}
*{box-sizing:border-box}
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;
background:var(--bg);color:var(--fg);font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{width:100%;max-width:24rem;margin:1rem;padding:2rem 1.5rem;background:var(--card);
border:1px solid var(--line);border-radius:12px}
h1{font-size:1.35rem;margin:0 0 1.25rem;text-align:center}
label{display:block;font-weight:600;margin-bottom:.5rem}
input[name=otp]{width:100%;padding:.7rem;font-size:1.6rem;letter-spacing:.4em;text-align:center;
font-variant-numeric:tabular-nums;border:1px solid var(--line);border-radius:8px;
background:transparent;color:inherit}
input[name=otp]:focus{outline:3px solid var(--accent);outline-offset:1px}
button{width:100%;margin-top:1rem;padding:.75rem;font-size:1rem;font-weight:600;border:0;
border-radius:8px;background:var(--accent);color:var(--accent-fg);cursor:pointer}
.message{margin:0 0 1rem;padding:.6rem .8rem;border-radius:8px;background:var(--error-bg);color:var(--error)}
.hint{color:var(--muted);font-size:.875rem;margin:.75rem 0 0;text-align:center}
"""
LOGIN_CSS_HASH = base64.b64encode(hashlib.sha256(LOGIN_CSS.encode()).digest()).decode()

LOGIN_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>Sign in · {app_name}</title>
<link rel="icon" href="data:,">
<style>{css}</style>
</head>
<body>
<main>
<h1>{app_name}</h1>
{message}<form method="post">
<label for="otp">Code from your authenticator app</label>
<input id="otp" name="otp" type="text" inputmode="numeric" pattern="[0-9]{{6}}" minlength="6"
 maxlength="6" autocomplete="one-time-code" autofocus required{disabled}>
<input type="hidden" name="next" value="{next}">
<input type="hidden" name="csrf" value="{csrf}">
<button type="submit"{disabled}>Sign in</button>
</form>
<p class="hint">Enter the 6-digit code your app shows for {app_name}.</p>
</main>
</body>
</html>
"""

MESSAGE = '<p class="message" role="alert">{}</p>\n'

# No form-action: Chromium applies it to the redirect after the POST, which
# would block returning to another host of a shared login (COOKIE_DOMAIN).
PAGE_CSP = (
    f"default-src 'none'; style-src 'sha256-{LOGIN_CSS_HASH}'; img-src data:; "
    "base-uri 'none'; frame-ancestors 'none'"
)
EMPTY_BODY = [("Content-Length", "0"), ("Content-Type", "text/plain")]  # validators want a type
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


def render_login(app_name, next_url, csrf, message="", disabled=False):
    return LOGIN_PAGE.format(
        app_name=escape(app_name),
        css=LOGIN_CSS,
        message=MESSAGE.format(escape(message)) if message else "",
        next=escape(next_url),
        csrf=escape(csrf),
        disabled=" disabled" if disabled else "",
    ).encode("utf-8")


def plural_minutes(seconds):
    minutes = max(1, math.ceil(seconds / 60))
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


# --- App --------------------------------------------------------------------

log = logging.getLogger("forward_auth")


class Metrics:
    """Counters and one latency histogram, rendered in Prometheus text format."""

    def __init__(self):
        self._lock = threading.Lock()
        self.verify = collections.Counter()
        self.logins = collections.Counter()
        self.rate_limited = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def observe_verify(self, result, seconds):
        with self._lock:
            self.verify[result] += 1
            self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
            self.latency_sum += seconds

    def count_login(self, result):
        with self._lock:
            self.logins[result] += 1
            if result == "limited":
                self.rate_limited += 1

    def render(self, users):
        lines = [
            "# HELP forward_auth_verify_total Verify and auth decisions by result.",
            "# TYPE forward_auth_verify_total counter",
        ]
        with self._lock:
            for result in ("allow", "redirect", "deny"):
                lines.append(f'forward_auth_verify_total{{result="{result}"}} {self.verify[result]}')
            lines += [
                "# HELP forward_auth_logins_total Login attempts by result.",
                "# TYPE forward_auth_logins_total counter",
            ]
            for result in ("success", "failure", "replay", "limited", "csrf"):
                lines.append(f'forward_auth_logins_total{{result="{result}"}} {self.logins[result]}')
            lines += [
                "# HELP forward_auth_rate_limited_total Login attempts refused by the guessing limits.",
                "# TYPE forward_auth_rate_limited_total counter",
                f"forward_auth_rate_limited_total {self.rate_limited}",
                "# HELP forward_auth_users Enrolled users.",
                "# TYPE forward_auth_users gauge",
                f"forward_auth_users {users}",
                "# HELP forward_auth_verify_duration_seconds Time to answer verify and auth.",
                "# TYPE forward_auth_verify_duration_seconds histogram",
            ]
            total = 0
            for bound, count in zip(LATENCY_BUCKETS + ("+Inf",), self.buckets):
                total += count
                lines.append(f'forward_auth_verify_duration_seconds_bucket{{le="{bound}"}} {total}')
            lines.append(f"forward_auth_verify_duration_seconds_sum {self.latency_sum:.6f}")
            lines.append(f"forward_auth_verify_duration_seconds_count {total}")
        return ("\n".join(lines) + "\n").encode()


class App:
    """The WSGI application. Build it with make_app()."""

    def __init__(self, settings, store, clock):
        self.settings = settings
        self.store = store
        self.clock = clock
        key = settings.jwt_secret.encode() if settings.jwt_secret else store.cookie_key()
        self.session_key = key
        self.device_key = derive_key(key, "device")
        self.csrf_key = derive_key(key, "csrf")
        self.trust = Trust(settings.trust_proxy)
        self.limiter = RateLimiter(
            settings.max_login_attempts, settings.rate_limit_window, settings.global_max_failures, clock=clock
        )
        self.metrics = Metrics()
        self.device_cookie = settings.cookie_name + "_device"
        self.csrf_cookie = settings.cookie_name + "_csrf"
        self._tokens = {}  # Cookie header -> verified session claims (HMAC done once)
        self._users = set()  # current user names
        self._deleted = {}  # name -> when it was last deleted
        self._revoked = {}  # jti -> expires
        self._version = None
        self._next_refresh = 0.0
        self._refresh_lock = threading.Lock()
        self.refresh(self.clock(), force=True)
        self.routes = {
            ("*", "/verify"): self.verify,
            ("*", "/auth"): self.auth,
            ("GET", "/login"): self.login_page,
            ("POST", "/login"): self.login,
            ("GET", "/logout"): self.logout,
            ("POST", "/logout"): self.logout,
            ("GET", "/health"): self.health,
            ("GET", "/metrics"): self.metrics_page,
        }

    # -- WSGI entry: every response leaves through _respond --

    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        try:
            handler = self._route(method, path)
            status, headers, body = handler(environ)
        except HTTPError as error:
            status, headers, body = error.status, error.headers, error.body
        except (KeyboardInterrupt, SystemExit):
            raise
        except sqlite3.Error as error:
            log.warning("database error: %s", error)
            status, headers, body = 503, [("Retry-After", "5")], b"Database unavailable\n"
        except Exception:
            log.exception("unexpected error on %s %s", method, path[:200])
            status, headers, body = 500, [], b"Internal error\n"
        return self._respond(start_response, status, headers, body, method == "HEAD")

    def _route(self, method, path):
        handler = self.routes.get(("*", path)) or self.routes.get(("GET" if method == "HEAD" else method, path))
        if handler is not None:
            return handler
        allowed = sorted({m for m, p in self.routes if p == path})
        if not allowed:
            raise HTTPError(404, b"Not found\n")
        if "GET" in allowed:
            allowed.append("HEAD")
        raise HTTPError(405, b"Method not allowed\n", [("Allow", ", ".join(sorted(allowed)))])

    @staticmethod
    def _respond(start_response, status, headers, body, head):
        if status == 200 and not body:
            # The allow answer to the proxy: nothing a browser renders, so no
            # page headers; each header costs waitress time on the hot path.
            start_response("200 OK", headers + EMPTY_BODY)
            return [b""]
        if isinstance(body, str):
            body = body.encode("utf-8")
        headers = list(headers)
        if not any(name == "Content-Type" for name, _ in headers):
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
        headers.append(("Content-Length", str(len(body))))
        start_response(STATUS_LINES.get(status, f"{status} Unknown"), headers + SECURITY_HEADERS)
        return [b"" if head else body]

    # -- Sessions --

    def refresh(self, now, force=False):
        """Reload users and revocations if any connection changed the database.

        /verify calls this at most every REFRESH_SECONDS: one PRAGMA, no table
        read unless something changed, and never a wait for another thread.
        """
        if not force and self._next_refresh - REFRESH_SECONDS <= now < self._next_refresh:
            return  # checked recently (a clock set back counts as due)
        if not self._refresh_lock.acquire(blocking=force):
            return  # another thread is already looking
        try:
            self._next_refresh = now + REFRESH_SECONDS
            if force or self.store.data_version() != self._version:
                self._version, users, deleted, revoked = self.store.snapshot()
                self._users, self._deleted = users, deleted
                self._revoked = {jti: exp for jti, exp in revoked.items() if exp > now}
        except sqlite3.Error as error:
            log.warning("cannot refresh from the database, serving from memory: %s", error)
        finally:
            self._refresh_lock.release()

    def session(self, environ):
        """The valid session's claims for this request, or None."""
        header = environ.get("HTTP_COOKIE")
        if not header:
            return None
        now = self.clock()
        self.refresh(now)
        claims = self._tokens.get(header)
        if claims is None:
            token = parse_cookies(header).get(self.settings.cookie_name)
            if not token:
                return None
            claims, _reason = verify_token(token, self.session_key, now)
            if claims is None:
                return None
            if len(header) <= TOKEN_CACHE_KEY_BYTES:  # a valid session padded with junk cookies stays uncached
                if len(self._tokens) >= TOKEN_CACHE_SIZE:
                    self._tokens.clear()
                self._tokens[header] = claims
        # Checked on every request, cached or not: expiry, revocation, the user.
        if claims["exp"] <= now or claims["jti"] in self._revoked or not self._user_current(claims):
            return None
        return claims

    def _user_current(self, claims):
        """The token's user exists and was not deleted since the token was issued."""
        sub = claims["sub"]
        return sub in self._users and claims["iat"] > self._deleted.get(sub, -1)

    # -- Check endpoints --

    def verify(self, environ):
        """Caddy/Traefik: 200 + Remote-User, a 302 to the login page for a browser, else 401."""
        started = time.perf_counter()
        allowed = self._allow(environ, started)
        if allowed:
            return allowed
        trusted = environ.get("REMOTE_ADDR", "") in self.trust
        method = (environ.get("HTTP_X_FORWARDED_METHOD") if trusted else None) or environ.get("REQUEST_METHOD")
        if not wants_html(environ, method.upper()):
            self.metrics.observe_verify("deny", time.perf_counter() - started)
            return 401, [], b"Unauthorized\n"
        location = self.login_location(original_url(environ, self.trust))
        self.metrics.observe_verify("redirect", time.perf_counter() - started)
        return 302, [("Location", location)], b""

    def auth(self, environ):
        """nginx auth_request: 200 + Remote-User, else 401 with the absolute login URL in Location."""
        started = time.perf_counter()
        allowed = self._allow(environ, started)
        if allowed:
            return allowed
        original = original_url(environ, self.trust)
        location = self.login_location(original)
        if location.startswith("/"):
            # nginx treats a relative Location as an internal redirect.
            if original:
                base = original[: original.index("/", original.index("//") + 2)]
            else:
                scheme, host = request_origin(environ, self.trust)
                base = f"{scheme}://{host}"
            location = base + location
        self.metrics.observe_verify("deny", time.perf_counter() - started)
        return 401, [("Location", location)], b"Unauthorized\n"

    def _allow(self, environ, started):
        """200 with Remote-User (always set, so a client's copy never passes) for a valid session, else None."""
        claims = self.session(environ)
        if claims is None:
            return None
        self.metrics.observe_verify("allow", time.perf_counter() - started)
        return 200, [("Remote-User", claims["sub"])], b""

    def login_location(self, original):
        if original is None:
            return self.settings.login_url
        return f"{self.settings.login_url}?next={urllib.parse.quote(original, safe='')}"

    # -- Login --

    def login_page(self, environ):
        query = parse_form(_wsgi_text(environ.get("QUERY_STRING", "")))
        next_value = query.get("next", query.get("redirect_uri", ""))
        if self.session(environ) is not None:
            return 302, [("Location", self.safe_next(environ, next_value))], b""
        return self.form_response(environ, 200, next_value)

    def form_response(self, environ, status, next_value, message="", extra_headers=(), disabled=False):
        """The login page with a CSRF token bound to the pre-login cookie (set if missing)."""
        headers = [("Content-Type", "text/html; charset=utf-8"), *extra_headers]
        nonce = parse_cookies(environ.get("HTTP_COOKIE", "")).get(self.csrf_cookie, "")
        if not re.fullmatch(r"[A-Za-z0-9_-]{43}", nonce, re.ASCII):
            nonce = secrets.token_urlsafe(32)
            headers.append(("Set-Cookie", self._cookie(self.csrf_cookie, nonce, None, "Lax", domain=False)))
        next_value = self.safe_next(environ, next_value)  # the page never carries an unsafe target
        page = render_login(self.settings.app_name, next_value, self._csrf_token(nonce), message, disabled)
        return status, headers, page

    def _csrf_token(self, nonce):
        return _b64encode(hmac.new(self.csrf_key, nonce.encode(), hashlib.sha256).digest())

    def login(self, environ):
        form = self._read_form(environ)
        query = parse_form(_wsgi_text(environ.get("QUERY_STRING", "")))
        next_value = form.get("next", query.get("next", query.get("redirect_uri", "")))
        if self._cross_site(environ):
            self.metrics.count_login("csrf")
            self._log_login("cross-site", None, client_ip(environ, self.trust))
            raise HTTPError(403, b"Cross-site login refused\n")
        nonce = parse_cookies(environ.get("HTTP_COOKIE", "")).get(self.csrf_cookie, "")
        given = form.get("csrf", "").encode("utf-8")  # bytes: compare_digest refuses non-ASCII str
        if not nonce or not hmac.compare_digest(self._csrf_token(nonce).encode(), given):
            self.metrics.count_login("csrf")
            self._log_login("csrf", None, client_ip(environ, self.trust))
            return self.form_response(environ, 403, next_value, "This form expired. Please enter the code again.")
        ip = client_ip(environ, self.trust)
        device = self._device(environ)
        key = f"device:{device}" if device else limiter_key_for_ip(ip)
        wait = self.limiter.acquire(key, device=bool(device))
        if wait:
            self.metrics.count_login("limited")
            self._log_login("limited", None, ip)
            message = f"Too many attempts. Try again in {plural_minutes(wait)}."
            return self.form_response(environ, 429, next_value, message, [("Retry-After", str(wait))], True)
        outcome = "undecided"
        try:
            now = self.clock()
            user, result = self._check_code(form.get("otp", ""), now)
            outcome = "success" if result == "success" else "failure"
        except sqlite3.Error as error:
            log.warning("login unavailable: database error: %s", error)
            message = "Signing in is unavailable for a moment. Please try again."
            return self.form_response(environ, 503, next_value, message, [("Retry-After", "5")])
        finally:
            self.limiter.release(key, device=bool(device), outcome=outcome)
        self.metrics.count_login(result)
        self._log_login(result, user, ip)
        if result != "success":
            return self.form_response(environ, 401, next_value, "Wrong code. Try again.")
        self.refresh(now, force=True)  # the user may be new to this process's cache
        location = self.safe_next(environ, next_value)
        return 302, [*self._login_cookies(user, now), ("Location", location)], b""

    def _check_code(self, code, now):
        """(user name or None, "success" | "failure" | "replay"); a success's step is stored first."""
        found = match_code(code, self.store.users(), now)
        if found is None:
            return None, "failure"
        user, step = found
        if not self.store.accept_step(user.name, step, now):  # RFC 6238 §5.2: one use per code
            return user.name, "replay"
        return user.name, "success"

    def _read_form(self, environ):
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise HTTPError(400, b"Bad Content-Length\n") from None
        if length > MAX_FORM_BYTES:
            raise HTTPError(413, b"Form too large\n")
        content_type = environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise HTTPError(415, b"Expected application/x-www-form-urlencoded\n")
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        return parse_form(body.decode("utf-8", "replace"))

    def _cross_site(self, environ):
        """A POST another site made the browser send (Fetch Metadata, then Origin)."""
        if environ.get("HTTP_SEC_FETCH_SITE", "").lower() == "cross-site":
            return True
        origin = environ.get("HTTP_ORIGIN")
        if origin is None or origin == "null":  # null: privacy modes send it; the token decides
            return False
        parts = urllib.parse.urlsplit(origin)
        try:
            _scheme, host = request_origin(environ, self.trust)
        except HTTPError:
            return True
        return parts.scheme not in DEFAULT_PORTS or normalise_host(parts.netloc, parts.scheme) != host

    def _device(self, environ):
        """The device id of a valid device cookie of a current user, or None."""
        token = parse_cookies(environ.get("HTTP_COOKIE", "")).get(self.device_cookie)
        if not token:
            return None
        claims, _ = verify_token(token, self.device_key, self.clock())
        if claims is None or not self._user_current(claims):
            return None
        return claims["jti"]

    def _login_cookies(self, name, now):
        s = self.settings
        session = sign_token(new_claims(name, now, s.session_ttl), self.session_key)
        device = sign_token(new_claims(name, now, DEVICE_COOKIE_SECONDS), self.device_key)
        return [
            ("Set-Cookie", self._cookie(s.cookie_name, session, s.session_ttl, s.same_site)),
            ("Set-Cookie", self._cookie(self.device_cookie, device, DEVICE_COOKIE_SECONDS, "Strict")),
        ]

    def _cookie(self, name, value, max_age, same_site, domain=True):
        parts = [f"{name}={value}", "Path=/"]
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

    def safe_next(self, environ, value):
        _scheme, login_host = self._login_origin(environ)
        return safe_next(value, login_host, self.settings)

    def _login_origin(self, environ):
        login_url = self.settings.login_url
        if login_url.startswith("/"):
            return request_origin(environ, self.trust)
        parts = urllib.parse.urlsplit(login_url)
        return parts.scheme, normalise_host(parts.netloc, parts.scheme)

    def _log_login(self, result, user, ip):
        if self.settings.log_format == "json":
            log.info(json.dumps({"event": "login", "result": result, "user": user or "-", "ip": ip}))
        else:
            log.info("login result=%s user=%s ip=%s", result, user or "-", ip)

    # -- Logout, health, metrics --

    def logout(self, environ):
        claims = self.session(environ)
        if claims is not None:
            self._revoked[claims["jti"]] = claims["exp"]  # this process: at once
            self.store.revoke(claims["jti"], claims["exp"])  # other processes, restarts
            self.store.purge_revoked(self.clock())  # expired tokens need no revocation
            self.refresh(self.clock(), force=True)  # so a refresh running now cannot drop it
            log.info("logout user=%s ip=%s", claims["sub"], client_ip(environ, self.trust))
        expired = self._cookie(self.settings.cookie_name, "", 0, self.settings.same_site)
        return 302, [("Set-Cookie", expired), ("Location", self.settings.login_url)], b""

    def health(self, environ):
        headers = [("Content-Type", "application/json")]
        try:
            self.store.ping()
            if not os.path.exists(self.store.path):
                raise sqlite3.OperationalError("database file is gone")
        except sqlite3.Error:
            return 503, headers, b'{"status":"unavailable"}'
        return 200, headers, b'{"status":"ok"}'

    def metrics_page(self, environ):
        self.refresh(self.clock())
        body = self.metrics.render(len(self._users))
        return 200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")], body


def make_app(settings, *, store=None, clock=time.time):
    """The WSGI app for `settings`; tests pass their own store and clock."""
    return App(settings, store or Store(settings.db_path), clock)


def __getattr__(name):
    """`forward_auth:app` for any WSGI server, built from the environment on first use."""
    if name == "app":
        globals()["app"] = make_app(Settings.from_env(os.environ))
        return globals()["app"]
    raise AttributeError(name)


# --- CLI --------------------------------------------------------------------


class _UsageError(Exception):
    pass


NEXT_FREE_NAME = object()  # -generate without a NAME: user, user2, ...


def build_parser():
    import argparse  # here, not at the top: serving without arguments never needs it

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise _UsageError(message)

    parser = Parser(
        prog="forward_auth.py",
        description="TOTP-only forward authentication for Caddy, nginx and Traefik.",
        epilog="Without a command it serves. Settings come from environment variables (see README).",
    )
    commands = parser.add_mutually_exclusive_group()
    commands.add_argument(
        "-generate", "--generate", nargs="?", const=NEXT_FREE_NAME, metavar="NAME", help="add a user and print its enrolment"
    )
    commands.add_argument("-list", "--list", action="store_true", help="list users")
    commands.add_argument("-revoke", "--revoke", metavar="NAME", help="delete a user and end their sessions")
    commands.add_argument("-backup", "--backup", metavar="FILE", help="write an online backup of the database")
    commands.add_argument("-version", "--version", action="store_true", help="print the version")
    return parser


HALF_BLOCKS = {(True, True): "\u2588", (True, False): "\u2580", (False, True): "\u2584", (False, False): " "}


def print_enrolment(name, seed, app_name, out=None):
    """The enrolment block: secret, otpauth URL and a QR code for the terminal."""
    out = out or sys.stdout
    uri = enrolment_uri(seed, name, app_name)
    out.write(f"User: {name}\nSecret: {seed}\nOTPAuth URL: {uri}\n")
    out.write(draw_qr(uri, colours=out.isatty()))
    out.flush()


def draw_qr(text, colours):
    """`text` as a QR code in half blocks, two module rows per line.

    With `colours`, dark modules are drawn black on white whatever the
    terminal's own colours, so light and dark terminals both scan. Without
    (a pipe, the journal), light modules are the blocks, which scans on the
    dark background most terminals and log viewers have.
    """
    import segno  # only here: the serving process does not carry its ~4 MB

    rows = [[bool(module) for module in row] for row in segno.make(text, error="m").matrix_iter(border=4)]
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


def cmd_generate(store, settings, name=NEXT_FREE_NAME, clock=time.time):
    if name is NEXT_FREE_NAME:
        name = next_free_name(store)
    elif not USER_NAME.fullmatch(name):
        raise _UsageError(f"invalid user name {name!r}: use 1-64 of A-Z a-z 0-9 . _ @ -")
    seed = new_seed()
    if not store.add_user(name, seed, clock()):
        raise RuntimeError(f"user {name!r} already exists")
    print_enrolment(name, seed, settings.app_name)
    return 0


def _format_time(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)) if epoch else "never"


def cmd_list(store):
    for user in store.users():
        print(f"{user.name}\tcreated {_format_time(user.created)}\tlast login {_format_time(user.last_login)}")
    return 0


def cmd_revoke(store, name):
    if not store.delete_user(name, time.time()):
        raise RuntimeError(f"no user named {name!r}")
    print(f"revoked {name}: their sessions stop working within a second")
    return 0


def cmd_backup(store, destination):
    if os.path.lexists(destination):
        raise RuntimeError(f"{destination} exists; not overwriting it")
    try:
        store.backup(destination)
    except FileExistsError:
        raise RuntimeError(f"{destination} exists; not overwriting it") from None
    print(f"backup written to {destination}")
    return 0


def configure_logging(settings):
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(_JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # waitress warns "Task queue depth is N" whenever requests wait for a free
    # thread, which under load is most of them: it floods the journal and costs
    # 10-20 % of throughput. Queueing is normal here; THREADS sizes it.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


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
    """A waitress server for `app`, listening but not yet running."""
    import waitress.server

    options = {"host": settings.host, "port": settings.port, "threads": settings.threads, **SERVER_OPTIONS}
    options.update(overrides)
    return waitress.server.create_server(app, **options)


def serve(settings, store):
    configure_logging(settings)
    if not store.users():
        cmd_generate(store, settings)
    app = make_app(settings, store=store)
    server = create_server(app, settings)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    _return_freed_memory()
    log.info("forward-auth %s listening on http://%s:%s", __version__, settings.host, server.effective_port)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        log.info("stopped")
    return 0


def _return_freed_memory():
    """Hand the compiler's freed memory back to the OS (about 1.7 MB of RSS).

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


SERVE = types.SimpleNamespace(generate=None, list=False, revoke=None, backup=None, version=False)  # no arguments


def main(argv=None, environ=None):
    """Run the command line; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv) if argv else SERVE
    except _UsageError as error:
        print(f"forward_auth: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # -h prints help and exits 0
        return exit_.code
    if args.version:
        print(f"forward-auth {__version__}")
        return 0
    try:
        settings = Settings.from_env(os.environ if environ is None else environ)
    except ConfigError as error:
        print(f"forward_auth: {error}", file=sys.stderr)
        return 2
    store = None
    try:
        store = Store(settings.db_path)
        if args.generate is not None:
            return cmd_generate(store, settings, args.generate)
        if args.list:
            return cmd_list(store)
        if args.revoke is not None:
            return cmd_revoke(store, args.revoke)
        if args.backup is not None:
            return cmd_backup(store, args.backup)
        return serve(settings, store)
    except _UsageError as error:
        print(f"forward_auth: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, sqlite3.Error) as error:
        print(f"forward_auth: {error}", file=sys.stderr)
        return 1
    finally:
        if store is not None:
            store.close()


if __name__ == "__main__":
    sys.exit(main())
