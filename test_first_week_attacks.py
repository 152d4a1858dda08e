"""Red team, issue 26 ("the household's first week"): GET /, lifetimes judged by today's settings,
the recorded LOGIN_URL, the COOKIE_DOMAIN warning, the login page's new messages.

A subagent given README and SPEC wrote these. HOLE: the attack worked when written (8 holes, all
fixed: a log flood and a 40 KB line through the COOKIE_DOMAIN warning, its advice steered by a
stranger's host, a stale or planted recorded LOGIN_URL beating the command line's own, terminal
escapes and a traceback from the recorded value, a sign-out lost when a lowered lifetime is raised
again, -sessions listing sessions a lowered lifetime ended); HELD: the defence held.

Loopback only; time from FakeClock; no sleeps."""

import contextlib
import io
import logging
import re
import urllib.parse
import wsgiref.util

import pytest

import forward_auth as fa
from conftest import NOW, Server, code_at, wrong_code_for
from test_forward_auth import (
    ADMIN,
    FORM,
    add_user,
    call,
    check,
    device_of,
    login,
    make_admin,
    session_cookie,
    settings,
    signed_in_as,
)

SHARED = "https://auth.home.example.net/login"


def run_main(args, db_path, **env):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fa.main(args, environ={"DB_PATH": db_path, **env})
    return code, out.getvalue(), err.getvalue()


def link_of(out):
    lines = [line for line in out.splitlines() if line.startswith("Link: ")]
    assert len(lines) == 1, out
    return lines[0][len("Link: "):]


def navigation(app, host, remote="127.0.0.1", path="/verify"):
    """An anonymous browser navigation, as a trusted proxy (Caddy) forwards it, for https://HOST/."""
    return call(app, "GET", path, remote=remote, headers={
        "Accept": "text/html", "X-Forwarded-Proto": "https", "X-Forwarded-Host": host, "X-Forwarded-Uri": "/"})


def reach_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage()]


# --- 4: the COOKIE_DOMAIN warning on the way to the login page ------------------------------


def test_the_cookie_reach_warning_cannot_be_turned_into_a_log_flood(store, clock, caplog):
    """HOLE: the warning is throttled per *requested host*, and the Throttle's max_keys bounds its
    memory, not the log: an anonymous client behind a catch-all site (Caddy `*.example.org`, a
    nginx default_server, IP literals) writes one line per request by naming a new host each
    time — 500 requests in the same second, 500 warning lines. The misconfiguration is one
    fact (LOGIN_URL's cookie does not reach the apps): a few lines a minute say it."""
    add_user(store, "alice")
    app = fa.make_app(settings(login_url=SHARED), store=store, clock=clock)
    with caplog.at_level(logging.WARNING, logger="forward_auth"):
        for i in range(500):
            assert navigation(app, f"h{i}.example.org").status == 302
    assert len(reach_warnings(caplog)) <= 5, len(reach_warnings(caplog))


def test_the_cookie_reach_warning_line_is_bounded_whatever_the_host(store, clock, caplog):
    """HOLE: a 20,000-character host name (waitress takes 32 KiB of headers) is written twice
    into one warning line: 40 KB a line, from an anonymous request."""
    add_user(store, "alice")
    app = fa.make_app(settings(login_url=SHARED), store=store, clock=clock)
    with caplog.at_level(logging.WARNING, logger="forward_auth"):
        assert navigation(app, "a" * 20000 + ".example.org").status == 302
    assert all(len(line) <= 1000 for line in reach_warnings(caplog)), [len(x) for x in reach_warnings(caplog)]


def test_the_cookie_reach_warning_never_takes_its_advice_from_a_strangers_host(store, clock, caplog):
    """HOLE: the household set COOKIE_DOMAIN=.home.example.net and every user's hosts are under it
    (the start warning rightly says nothing). A stranger's navigation naming evil.example.net
    makes the server log "widen COOKIE_DOMAIN to .example.net": advice, steered from outside,
    to send the household's session cookie to every host of a parent domain it may not own.
    A host no user may open should not be a reason to widen the cookie."""
    add_user(store, "teen")
    store.set_hosts("teen", ["wiki.home.example.net", "*.media.home.example.net"])
    s = settings(login_url=SHARED, cookie_domain=".home.example.net")
    app = fa.make_app(s, store=store, clock=clock)
    with caplog.at_level(logging.WARNING, logger="forward_auth"):
        fa._warn_if_the_cookie_cannot_reach_users_hosts(store, s)
        assert reach_warnings(caplog) == []  # the start warning: nothing to fix
        assert navigation(app, "evil.example.net").status == 302
    # It may say the host came; it never advises a COOKIE_DOMAIN taken from the stranger's host.
    assert not [line for line in reach_warnings(caplog) if "widen" in line or " .example.net" in line
                or "=.example.net" in line], reach_warnings(caplog)


def test_the_cookie_reach_warning_logs_no_hostile_host_text(store, clock, caplog):
    """HELD: a forwarded host with CR/LF, a quote or a space is refused by the host grammar
    (no original URL, no warning line), and an untrusted peer's X-Forwarded-Host is not read:
    nothing an attacker types beyond [A-Za-z0-9_.-] reaches the log."""
    app = fa.make_app(settings(login_url=SHARED), store=store, clock=clock)
    with caplog.at_level(logging.WARNING, logger="forward_auth"):
        for host in ("evil.example.org\r\nforged: line", "evil.example.org\nINFO login result=success",
                     'evil".example.org', "evil example.org", "evil.example.org%0a"):
            navigation(app, host)
        navigation(app, "untrusted.example.org", remote="192.0.2.7")
    for line in reach_warnings(caplog):
        assert "\n" not in line and "\r" not in line and '"' not in line and "untrusted" not in line, line


def test_a_crlf_host_through_real_waitress_never_reaches_the_log_or_a_location(store, clock, caplog):
    """HELD: through real waitress, a header with a bare LF or CR is a 400 before the app."""
    app = fa.make_app(settings(login_url=SHARED), store=store, clock=clock)
    server = Server(app)
    try:
        import socket
        with caplog.at_level(logging.WARNING, logger="forward_auth"):
            for bad in (b"evil.example.org\nX: y", b"evil.example.org\rX: y"):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
                try:
                    sock.sendall(b"GET /verify HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/html\r\n"
                                 b"X-Forwarded-Proto: https\r\nX-Forwarded-Uri: /\r\nX-Forwarded-Host: " + bad +
                                 b"\r\nConnection: close\r\n\r\n")
                    answer = b""
                    while chunk := sock.recv(65536):
                        answer += chunk
                finally:
                    sock.close()
                assert not answer.startswith(b"HTTP/1.1 302"), answer[:200]
    finally:
        server.stop()
    assert all("\n" not in line and "X: y" not in line for line in reach_warnings(caplog))


# --- 3: the LOGIN_URL recorded in the database -----------------------------------------


def _record(db_path, value):
    s = fa.Store(db_path)
    try:
        s._write("INSERT OR REPLACE INTO meta VALUES ('login_url', ?)", (value,))
    finally:
        s.close()


@pytest.mark.parametrize("how", ["restore of the household's own old backup", "a write into meta"])
def test_a_stale_or_planted_recorded_login_url_does_not_beat_the_clis_own_absolute_login_url(db_path, tmp_path, how):
    """HOLE: the recorded value wins over the CLI's own, explicit, absolute LOGIN_URL (a stderr
    note only), and --url cannot correct it (a usage error). -restore keeps the backup's
    meta.login_url, and its output says to send voided invitations again with -invite — which
    runs before the server starts and re-records. A backup from before a move to a new domain
    (the old one lapsed: anyone may register it now), or a value planted by whoever can write
    the database, sends the invitation link (a one-use token that enrols a phone as that
    person, an admin's reset included) to that host. Someone who can write the database but
    not read the key gets no seed from it; with this they get a working enrolment."""
    env = {"LOGIN_URL": "https://auth.example.com/login", "COOKIE_DOMAIN": ".example.com"}
    assert run_main(["-generate", "alice"], db_path, **env)[0] == 0
    if how.startswith("restore"):
        _record(db_path, "https://auth.old-domain.example.org/login")  # the server before the move
        assert run_main(["-backup", str(tmp_path / "old.db")], db_path)[0] == 0
        _record(db_path, "https://auth.example.com/login")  # today's server, after the move
        code, _out, err = run_main(["-restore", str(tmp_path / "old.db")], db_path, **env)
        assert code == 0, err
    else:
        _record(db_path, "https://auth.old-domain.example.org/login")
    code, out, err = run_main(["-invite", "oma"], db_path, **env)
    assert "old-domain" not in out  # no link to the other host, ever
    if code == 2:  # two absolute LOGIN_URLs that disagree: refused, both named, nothing made
        assert "the running server's is https://auth.old-domain.example.org/login" in err and out == ""
        assert fa.Store(db_path).user("oma") is None
    else:
        assert code == 0, err
        assert link_of(out).startswith("https://auth.example.com/login?invite="), (link_of(out), err)


def test_a_recorded_login_url_is_never_printed_with_terminal_escapes(db_path):
    """HOLE: an absolute LOGIN_URL's path is not checked against the relative one's grammar, so a
    recorded value with ESC/BEL passes as_login_url and -invite prints it raw (the Link line and
    the stderr note): an OSC 8 hyperlink whose text is the real host and whose target is
    another, or a screen rewrite. Every other stored value the CLI prints goes through
    shown()."""
    assert run_main(["-generate", "alice"], db_path)[0] == 0
    _record(db_path, "https://auth.example.com/login\x1b]8;;https://evil.example.org/\x07x\x1b]8;;\x07")
    for env in ({}, {"LOGIN_URL": "https://auth.example.com/login"}):
        code, out, err = run_main(["-invite", "oma"], db_path, **env)
        assert code == 0
        assert not fa.CONTROL_CHARACTERS.search(out.replace("\n", "")), repr(link_of(out))
        assert not fa.CONTROL_CHARACTERS.search(err.replace("\n", "")), repr(err)


@pytest.mark.parametrize("value", [b"https://auth.example.com/login", b"\xff/login"])
def test_a_recorded_login_url_that_is_not_text_is_no_traceback(db_path, value):
    """HOLE: SPEC (3.0 review): nothing read from the database yields a CLI traceback. A
    meta.login_url stored as a BLOB (a hand edit, a crafted backup: -restore checks the schema,
    not the values' types) makes -invite die in as_login_url with a TypeError traceback instead
    of using this environment's LOGIN_URL. (A number is stored as text by the column's affinity:
    that one is refused cleanly.)"""
    assert run_main(["-generate", "alice"], db_path)[0] == 0
    _record(db_path, value)
    try:
        code, out, err = run_main(["-invite", "oma"], db_path)
    except Exception as error:  # noqa: BLE001 - the traceback a user would see
        pytest.fail(f"-invite raised {type(error).__name__}: {error}")
    assert code == 0 and link_of(out).startswith("/login?invite="), (code, out, err)


@pytest.mark.parametrize("value", ["javascript:alert(1)//", "//evil.example.org/login", "https://a@evil.example.org/login",
                                   "https://evil.example.org/login?x=1", "ftp://evil.example.org/login", "/verify",
                                   "https://auth.example.com/../verify"])
def test_a_recorded_login_url_of_the_wrong_shape_is_ignored(db_path, value):
    """HELD: the recorded value is validated on read (as_login_url, login_url_of): another
    scheme, userinfo, a query, a reserved path falls back to this environment's /login."""
    assert run_main(["-generate", "alice"], db_path)[0] == 0
    _record(db_path, value)
    code, out, err = run_main(["-invite", "oma"], db_path)
    assert code == 0 and link_of(out).startswith("/login?invite="), (value, out, err)


def test_a_recorded_login_url_with_a_newline_in_its_host_prints_a_clean_link(db_path):
    """HELD: urlsplit drops CR/LF/TAB and the link is rebuilt from the normalised host."""
    assert run_main(["-generate", "alice"], db_path)[0] == 0
    _record(db_path, "https://auth.exa\nmple.com/log\rin\n")
    code, out, _ = run_main(["-invite", "oma"], db_path)
    assert code == 0 and re.fullmatch(r"https://auth\.example\.com/login\?invite=[A-Za-z0-9_-]{43}", link_of(out))


def test_a_contradicting_url_changes_nothing_and_an_equal_one_in_another_spelling_is_accepted(db_path):
    """HELD: --url that contradicts the recorded absolute LOGIN_URL is exit 2 with nothing
    created; the same host in capitals, with :443 and a trailing slash, is the same base."""
    _record(db_path, "https://auth.example.com/login")
    code, out, err = run_main(["-invite", "oma", "--url", "https://evil.example.org"], db_path)
    assert code == 2 and out == "" and "not where the login page is" in err
    s = fa.Store(db_path)
    assert s.user("oma") is None
    s.close()
    code, out, _ = run_main(["-invite", "oma", "--url", "HTTPS://Auth.Example.COM:443/"], db_path)
    assert code == 0 and link_of(out).startswith("https://auth.example.com/login?invite=")


# --- 1: GET / ----------------------------------------------------------------------


@pytest.mark.parametrize("login_url", ["/login", "/sso/login", SHARED])
def test_root_redirects_only_to_the_configured_login_page(store, clock, login_url):
    """HELD: / answers 302 to LOGIN_URL itself, whatever Host, X-Forwarded-Host/-Proto,
    X-Original-URL or query a client sends (trusted peer or not): no open redirect."""
    app = fa.make_app(settings(login_url=login_url), store=store, clock=clock)
    hostile = [{}, {"Host": "evil.example.org"}, {"X-Forwarded-Host": "evil.example.org", "X-Forwarded-Proto": "https"},
               {"X-Original-URL": "https://evil.example.org/"}, {"X-Forwarded-Uri": "//evil.example.org/"}]
    for headers in hostile:
        for remote in ("127.0.0.1", "192.0.2.9"):
            for query in ("", "next=https://evil.example.org/", "redirect_uri=//evil.example.org"):
                r = call(app, "GET", "/", query=query, headers=headers, remote=remote)
                assert (r.status, r.header("Location")) == (302, login_url), (headers, remote, query)
                assert r.body == b""
    assert call(app, "GET", "//evil.example.org").status == 404  # not the home route
    assert call(app, "POST", "/").status == 405


def test_root_through_real_waitress_is_the_same_constant_redirect(store, clock):
    """HELD: on real waitress with a hostile Host, / is a 302 to the configured login page."""
    app = fa.make_app(settings(login_url=SHARED, cookie_domain=".home.example.net"), store=store, clock=clock)
    server = Server(app)
    try:
        r = server.request("GET", "/?next=https://evil.example.org", headers={"Host": "evil.example.org",
                                                                            "X-Forwarded-Host": "evil.example.org"})
    finally:
        server.stop()
    assert (r.status, r.header("Location")) == (302, SHARED)


# --- 2: lower lifetimes --------------------------------------------------------------


def test_a_sign_out_with_a_cookie_past_the_lowered_lifetime_is_kept_when_it_is_raised_again(store, clock):
    """HOLE: README: "a sign-out is still kept until the cookie's own expiry, so raising them
    again brings nothing back". A session issued under 24 h, a restart with 60 s lifetimes:
    the cookie is refused (right), and the person at the friend's computer signs out with it —
    /logout finds no live session (claims["until"] passed) and no replaced one, so nothing is
    revoked. Back to 24 h a moment later, the cookie they signed out with opens everything
    again. (-logout NAME --session ID cannot end it either: -sessions hides it.) Fix: a sign-out
    revokes any correctly signed token of the user until its own `exp`, whatever today's
    lifetimes say."""
    alice = add_user(store, "alice")
    day = fa.make_app(settings(), store=store, clock=clock)
    cookie = session_cookie(day, login(day, code_at(alice, clock())))
    clock.advance(120)
    short = fa.make_app(settings(session_ttl=60, session_max=60), store=store, clock=clock)
    assert check(short, cookie).status == 401
    assert call(short, "GET", "/logout", headers={"Cookie": cookie}).status == 302
    again = fa.make_app(settings(), store=store, clock=clock)
    assert check(again, cookie).status == 401


def test_sessions_lists_no_session_that_the_lowered_idle_lifetime_ended(store, clock, db_path):
    """HOLE: SPEC: -sessions shows the live sessions and each one's current expiry. With
    SESSION_TTL_SECONDS lowered to 60 s the gate refuses a 2-minute-old session, but
    live_sessions filters only by SESSION_MAX (from the login), so -sessions (run with the very
    same settings) still lists it, with the expiry of the day it was issued. The household
    sees a session as live that is not, and the one the server will judge live again if
    the setting is raised. (With DB_PATH alone the CLI uses the default 30-day cap, not the
    server's, so a lowered SESSION_MAX is not seen either: the same problem LOGIN_URL had.)"""
    alice = add_user(store, "alice")
    day = fa.make_app(settings(), store=store, clock=clock)
    cookie = session_cookie(day, login(day, code_at(alice, clock())))
    clock.advance(120)
    short = fa.make_app(settings(session_ttl=60), store=store, clock=clock)
    assert check(short, cookie).status == 401
    live = store.live_sessions("alice", clock(), (short.settings.session_ttl, short.settings.session_max))
    assert live == [], live


def test_a_renewal_after_a_lower_session_max_never_passes_the_new_cap(store, clock):
    """HELD: a session issued under 30 days, restarted with TTL 1 h / MAX 2 h: /login?renew=1
    renews only up to login + 2 h (cookie exp and Max-Age), and past the cap it is the form."""
    alice = add_user(store, "alice")
    before = fa.make_app(settings(), store=store, clock=clock)
    cookie = session_cookie(before, login(before, code_at(alice, clock())))
    login_at = int(clock())
    after = fa.make_app(settings(session_ttl=3600, session_max=7200), store=store, clock=clock)
    clock.advance(5000)  # the old token's until is login + 3600: gone
    assert check(after, cookie).status == 401
    # A fresh one under today's settings, renewed near its cap.
    clock.advance(fa.STEP)
    fresh = session_cookie(after, login(after, code_at(alice, clock())))
    login_at = int(clock())
    renewals = 0
    for _ in range(3):
        clock.advance(1801 + 900)
        r = call(after, "GET", "/login", query="renew=1&next=%2F", headers={"Cookie": fresh})
        value = r.cookie_value(after.settings.cookie_name)
        if value:
            claims, _ = fa.verify_token(value, after.gate.session_key, clock())
            assert claims["exp"] <= login_at + 7200 and "until" not in claims
            line = r.cookies()[after.settings.cookie_name]
            assert int(re.search(r"Max-Age=(\d+)", line).group(1)) <= login_at + 7200 - claims["iat"]
            fresh = f"{after.settings.cookie_name}={value}"
            renewals += 1
    assert renewals == 2  # the second one capped at exactly login + 2 h
    clock.now = login_at + 7200
    r = call(after, "GET", "/login", query="renew=1&next=%2F", headers={"Cookie": fresh})
    assert r.status == 200 and 'name="otp"' in r.text


def test_a_2_0_token_without_auth_time_is_capped_from_its_iat(store, clock):
    """HELD: a token with no auth_time (2.0) is judged from its iat by the lowered cap."""
    add_user(store, "alice")
    app = fa.make_app(settings(session_ttl=600, session_max=600), store=store, clock=clock)
    app.refresh(clock(), force=True)
    iat = int(clock()) - 601
    token = fa.sign_token({"sub": "alice", "iat": iat, "exp": iat + 86400, "jti": "old-2-0-token-jti"},
                          app.gate.session_key)
    assert check(app, f"{app.settings.cookie_name}={token}").status == 401
    iat = int(clock()) - 300
    token = fa.sign_token({"sub": "alice", "iat": iat, "exp": iat + 86400, "jti": "new-2-0-token-jti"},
                          app.gate.session_key)
    assert check(app, f"{app.settings.cookie_name}={token}").status == 200


def test_the_admin_page_refuses_a_session_the_lowered_lifetime_ended(store, clock):
    """HELD: an admin's session (with its fresh cookie) issued under 24 h, a restart with
    TTL 60 s: the admin page sends the browser to the login page, no admin content."""
    oma = make_admin(store, "oma")
    day = fa.make_app(settings(), store=store, clock=clock)
    cookie = signed_in_as(day, oma, clock)
    assert call(day, "GET", ADMIN, headers={"Cookie": cookie}).status == 200
    clock.advance(120)
    short = fa.make_app(settings(session_ttl=60, session_max=60, admin_fresh=600), store=store, clock=clock)
    r = call(short, "GET", ADMIN, headers={"Cookie": cookie})
    assert r.status in (302, 303) and "login" in (r.header("Location") or ""), (r.status, r.header("Location"))


def test_raising_the_lifetimes_does_not_bring_back_a_renewed_away_or_revoked_token(store, clock):
    """HELD: revocations (a renewal's, a logout's) are kept until the token's own exp, so a
    short restart, a purge and a restart with the long lifetimes bring neither back."""
    alice = add_user(store, "alice")
    day = fa.make_app(settings(), store=store, clock=clock)
    first = session_cookie(day, login(day, code_at(alice, clock())))
    clock.advance(43300)  # past half of 24 h: a navigation renews
    r = call(day, "GET", "/login", query="renew=1&next=%2F", headers={"Cookie": first})
    renewed = f"{day.settings.cookie_name}={r.cookie_value(day.settings.cookie_name)}"
    assert check(day, first).status == 401 and check(day, renewed).status == 200
    short = fa.make_app(settings(session_ttl=60, session_max=60), store=store, clock=clock)
    clock.advance(3600)
    short.gate.purge_expired(clock())
    again = fa.make_app(settings(), store=store, clock=clock)
    assert check(again, first).status == 401


# --- 5: the login page's new messages ---------------------------------------------------


def _device_for(app, name, now):
    return f"{app.cookies.device_name}=" + fa.sign_token(fa.new_claims(name, now, fa.DEVICE_COOKIE_SECONDS),
                                                        app.cookies.device_key)


def test_wrong_code_for_name_is_html_escaped(store, clock):
    """HELD: a name with markup (only reachable through a hand-edited database: the CLI's name
    grammar refuses it) is escaped in "Signing in as", "Wrong code for … Not …?" and the button."""
    name = '<img src=x onerror=alert(1)>"\'&'
    store.add_user(name, fa.new_seed(), NOW - 3600)
    app = fa.make_app(settings(), store=store, clock=clock)
    app.refresh(clock(), force=True)
    r = login(app, "000000", extra_cookie=_device_for(app, name, clock()))
    assert r.status == 401
    assert "<img" not in r.text and "&lt;img src=x onerror=alert(1)&gt;&quot;&#x27;&amp;" in r.text
    assert "Wrong code for &lt;img" in r.text


def test_wrong_code_for_name_needs_a_genuine_device_of_a_current_user(store, clock):
    """HELD: the named message (and the one-user guessing) comes only with a validly signed
    device cookie of a user who exists and was not deleted since: a forged cookie, a session
    cookie passed as a device, a deleted user's device, two users' devices at once all get the
    plain "Wrong code. Try again." and count as anonymous."""
    oma, opa = add_user(store, "oma"), add_user(store, "opa")
    app = fa.make_app(settings(), store=store, clock=clock)
    first = login(app, code_at(oma, clock()))
    session, oma_device = session_cookie(app, first), device_of(app, first)
    clock.advance(fa.STEP)
    opa_device = device_of(app, login(app, code_at(opa, clock())))
    wrong = wrong_code_for(oma, opa, now=clock())
    forged = oma_device[:-4] + ("AAAA" if not oma_device.endswith("AAAA") else "BBBB")
    as_device = f"{app.cookies.device_name}={session.split('=', 1)[1]}"
    for cookie in (forged, as_device, f"{oma_device}; {opa_device}"):
        r = login(app, wrong, extra_cookie=cookie)
        assert r.status == 401 and "Wrong code. Try again." in r.text and "Wrong code for" not in r.text, cookie
    store.delete_user("opa", clock())
    app.refresh(clock(), force=True)
    r = login(app, wrong, extra_cookie=opa_device)
    assert "Wrong code. Try again." in r.text and "for opa" not in r.text and "as opa" not in r.text


def test_the_plain_http_reason_is_not_shown_for_an_untrusted_peers_forwarded_proto(store, clock):
    """HELD: served over HTTPS to an untrusted peer that claims X-Forwarded-Proto: http, a bad
    CSRF token is "form expired" (the header is not believed); from the trusted proxy it is
    the plain-HTTP reason."""
    add_user(store, "alice")
    app = fa.make_app(settings(secure_cookies=True), store=store, clock=clock)
    body = urllib.parse.urlencode({"otp": "123456", "csrf": "x", "next": "/"}).encode()

    def post(remote):
        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/login", "QUERY_STRING": "", "REMOTE_ADDR": remote,
                   "SERVER_NAME": "auth.example.com", "SERVER_PORT": "443", "HTTP_HOST": "auth.example.com",
                   "wsgi.url_scheme": "https", "HTTPS": "on", "HTTP_X_FORWARDED_PROTO": "http",
                   "CONTENT_TYPE": FORM["Content-Type"], "CONTENT_LENGTH": str(len(body)),
                   "wsgi.input": io.BytesIO(body)}
        wsgiref.util.setup_testing_defaults(environ)
        captured = {}
        chunks = app(environ, lambda status, headers, exc=None: captured.update(status=int(status.split()[0])))
        text = b"".join(chunks).decode()
        return captured["status"], re.search(r'<p class="message"[^>]*>(.*?)</p>', text, re.DOTALL).group(1)

    status, message = post("192.0.2.50")
    assert status == 403 and "expired" in message and "plain HTTP" not in message
    status, message = post("127.0.0.1")
    assert status == 403 and "plain HTTP" in message
