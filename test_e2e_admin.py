"""End-to-end, 4.0: the admin page attacked through the real proxies on the shipped configs.

A third red team (a subagent given README and SPEC) wrote these. One hole, fixed: Caddy and nginx
route `/login/admin/..%2f..%2fx` to the app (they match the cleaned path) while Chromium sends it
with the admin cookie (it matches the raw path), and the shipped cookie filters did not know that
cookie. The filters now drop it, and forward-auth refuses any check for an admin address.

Real Caddy, nginx and Traefik (test_e2e's harness: the shipped files with ports and host names
swapped), forward-auth on waitress with a FakeClock, the echo app behind, headless Chromium.
Loopback only. Each test asserts the SECURE behaviour: a test whose docstring starts "HOLE:"
fails on the code it was written against; "HELD:" ones pass and keep it so.

Run: FORWARD_AUTH_REQUIRE_E2E=1 python -m pytest -q test_e2e_admin.py
"""

import html
import itertools
import json
import re
import socket
import time
import urllib.parse

import pytest

import test_e2e as e
from conftest import csrf_token_of
from test_e2e import APP, APP1, APP2, AUTH, DOMAIN, browser, tmp, upstream  # noqa: F401 - fixtures

ADMIN = "/login/admin"
HOUSEHOLD = b"Invite someone"  # only the household's own page (the list) says this
NAMES = (f"rt3u{i}" for i in itertools.count())


# --- Rigs: a proxy on its shipped config, with services of its own -------------------------


class Rig:
    """One running proxy and what an admin reaches through it: (login host, service) pairs."""

    def __init__(self, kind, tmp, upstream):  # noqa: F811 - the fixtures imported above
        self.kind = kind
        self.own = e.ForwardAuth(tmp) if kind != "traefik" else None
        try:
            self.proxy = e.start_proxy(kind, tmp, self.own, upstream, name=f"rt3-{kind}-{e.free_port()}")
        except BaseException:
            if self.own is not None:
                self.own.stop()
            raise
        p = self.proxy
        self.port = p.port
        # The same-host login (APP; Traefik: APP1, each app its own), and the shared login host.
        self.same_host = (APP if kind != "traefik" else APP1, p.single)
        self.logins = [self.same_host] + ([(AUTH, p.shared)] if kind != "traefik" else [])
        for _, service in self.logins:
            e.make_admin_of(service)

    def stop(self):
        self.proxy.stop()
        if self.own is not None:
            self.own.stop()

    def url(self, host, path):
        return self.proxy.url(host, path)

    def origin(self, host):
        return f"http://{host}:{self.port}"


@pytest.fixture(scope="module", params=["caddy", "nginx", "traefik"])
def rig(request, tmp, upstream):  # noqa: F811 - the fixtures imported above
    running = Rig(request.param, tmp, upstream)
    yield running
    running.stop()


@pytest.fixture(scope="module", params=["caddy", "nginx"])
def rig_cn(request, tmp, upstream):  # noqa: F811 - the fixtures imported above
    """Caddy or nginx: the two with a shared-login-host variant and a cookie filter of their own."""
    running = Rig(request.param, tmp, upstream)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def rig_traefik(tmp, upstream):  # noqa: F811 - the fixtures imported above
    running = Rig("traefik", tmp, upstream)
    yield running
    running.stop()


# --- Helpers: a client that signs in and uses the admin page over raw HTTP -----------------


def cookie_header(jar):
    return "; ".join(f"{k}={v}" for k, v in jar.items())


def jar_of(reply, jar=None):
    jar = dict(jar or {})
    for name, value in reply.headers:
        if name.lower() == "set-cookie":
            pair = value.split(";", 1)[0]
            key, _, val = pair.partition("=")
            if "Max-Age=0" in value:
                jar.pop(key, None)
            else:
                jar[key] = val
    return jar


def sign_in_for_admin(rig, host, service, name="alice"):
    """NAME signs in from the admin page's own address (the login comes back to it): the cookies."""
    location, _ = e.follow_to_login(rig.proxy, host, ADMIN)
    login = e.login_through(rig.proxy, location.hostname or host, e.login_path_of(location), service.code(name))
    assert login.status == 302 and login.cookie("auth_token"), (login.status, login.body[:200])
    return jar_of(login)


def get(rig, host, path, jar, headers=None):
    return rig.proxy.request("GET", host, path, headers={"Accept": "text/html", "Cookie": cookie_header(jar),
                                                        **(headers or {})})


def post(rig, host, path, jar, form, headers=None, origin=None):
    return rig.proxy.request("POST", host, path, body=urllib.parse.urlencode(form), headers={
        "Content-Type": "application/x-www-form-urlencoded", "Cookie": cookie_header(jar),
        "Origin": origin or rig.origin(host), **(headers or {})})


def admin_csrf(rig, host, jar):
    page = get(rig, host, ADMIN, jar)
    assert page.status == 200 and HOUSEHOLD in page.body, (page.status, page.body[:300])
    return csrf_token_of(page.body.decode())


def invitation_link(rig, host, jar, reply):
    """The link the 'shown once' page of an invite's 303 shows."""
    assert reply.status == 303, (reply.status, reply.body[:300])
    target = urllib.parse.urlsplit(reply.header("Location"))
    shown = get(rig, host, target.path + "?" + target.query, jar)
    assert shown.status == 200, shown.status
    return html.unescape(re.search(rb'class="link" readonly value="([^"]+)"', shown.body).group(1).decode())


def domain_cookies(jar):
    """What a browser sends to an app host behind the shared login: the Domain=.example.test cookies
    (session, device), not the login host's host-only ones (CSRF, admin)."""
    return {k: v for k, v in jar.items() if k in ("auth_token", "auth_token_device")}


def exists(service, name):
    return service.store.user(name) is not None


def raw(port, text, deadline=5.0):
    """Bytes written as they are; (status, head, body) of the first answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=deadline) as conn:
        conn.sendall(text.encode("latin-1"))
        status, lines, rest = e.read_head(conn, time.monotonic() + deadline)
    return status, lines, rest


# --- The admin cookie and the app behind --------------------------------------------------

ENCODED_SLASH_ESCAPES = ["/login/admin/..%2f..%2fsteal", "/login/admin/..%2F..%2Fsteal",
                         "/login/admin/x/..%2f..%2f..%2fsteal"]


def sign_in_in_chromium(page, rig, host, service):
    admin_url = rig.url(host, ADMIN)
    page.goto(admin_url)
    page.fill("#otp", service.code())
    page.click("button[type=submit]")
    page.wait_for_url(admin_url)
    assert page.text_content("h1") == "Manage the household"


def cookies_the_app_saw(page):
    """The Cookie header the echo app received for the page now shown, or None if it is not the app's."""
    if page.locator("#seen").count() == 0:
        return None
    return json.loads(page.text_content("#seen"))["cookie"] or ""


def test_an_encoded_slash_path_hands_the_admin_cookie_to_the_app_in_chromium(rig_cn, browser):  # noqa: F811
    """Found by the red team (fixed): Caddy and nginx hand the admin's `auth_token_admin` cookie to the app behind.

    Chromium keeps `%2f` in a path and sends the admin cookie (Path=/login/admin) to
    /login/admin/..%2f..%2fsteal. Caddy's `path` matcher and nginx's `location` both decode and
    clean the path (/steal), so the request is the app's: checked by /verify, then proxied with
    its raw path, and the shipped Cookie filters drop only auth_token, _device, _csrf and
    _invite, never _admin. A link, image or redirect from the app (same site, so SameSite=Strict
    does not stop it) collects an admin's freshness cookie; the README promises "no app behind
    ever receives it"."""
    rig = rig_cn
    host, service = rig.same_host
    context = browser.new_context()
    try:
        page = context.new_page()
        sign_in_in_chromium(page, rig, host, service)
        leaked = []
        for path in ENCODED_SLASH_ESCAPES:
            page.goto(rig.url(host, path))
            seen = cookies_the_app_saw(page)
            if seen is not None and "auth_token_admin=" in seen:
                leaked.append(path)
        assert leaked == [], f"{rig.kind}: the app received auth_token_admin at {leaked}"
    finally:
        context.close()


def test_no_browser_path_hands_the_admin_cookie_to_the_app_through_traefik(rig_traefik, browser):  # noqa: F811
    """HELD. through Traefik (which passes the session cookie on to the app, so the admin cookie
    beside it would be the whole household) no path Chromium sends the admin cookie with reaches
    the app: Traefik matches PathPrefix on the escaped path (%2f stays, so ..%2f.. is forward-auth's
    404), and the spellings it would clean (%2e%2e) Chromium already resolved before choosing
    cookies. Upper case and /login%2fadmin reach the app without the admin cookie."""
    rig = rig_traefik
    host, service = rig.same_host
    context = browser.new_context()
    try:
        page = context.new_page()
        sign_in_in_chromium(page, rig, host, service)
        for path in ENCODED_SLASH_ESCAPES + ["/login/admin/%2e%2e/%2e%2e/steal", "/login/admin/.%2e/.%2e/steal",
                                             "/LOGIN/admin/steal", "/login%2fadmin/steal", "/login/admin/..%5csteal",
                                             "/login/admin/%2F/../../steal", "/login/admin/..;/..;/steal"]:
            page.goto(rig.url(host, path))
            seen = cookies_the_app_saw(page)
            assert seen is None or "auth_token_admin=" not in seen, (path, seen)
    finally:
        context.close()


def test_the_shipped_cookie_filters_drop_the_admin_cookie(rig_cn):
    """Found by the red team (fixed): the Caddy and nginx Cookie filters, which exist so that "the app behind does not
    receive forward-auth's own cookies", match `auth_token(_device|_csrf|_invite)?` and were not
    extended when 4.0 added `auth_token_admin`. Any request that carries it (the path above, a
    client that has it) passes it to the app. The same filter on every other forward-auth cookie
    holds."""
    rig = rig_cn
    host, service = rig.same_host
    jar = sign_in_for_admin(rig, host, service)
    assert "auth_token_admin" in jar
    sent = f"app_session=1; auth_token={jar['auth_token']}; auth_token_admin={jar['auth_token_admin']}; theme=dark"
    page = rig.proxy.request("GET", host, e.marker("cookies"), headers={"Cookie": sent})
    assert page.status == 200 and page.seen["remote_user"] == ["alice"]
    assert page.seen["cookie"] == "app_session=1; theme=dark", page.seen["cookie"]


# --- Path spellings: who gets the household page ----------------------------------------

SPELLINGS = ["/login/admin", "/login/admin/", "/login/%61dmin", "/login%2fadmin", "/login/admin%2f",
             "/login//admin", "/login/./admin", "/LOGIN/admin", "/login/admin;x", "/login/admin/..%2f..%2fx",
             "/login/admin/%2e%2e/%2e%2e/x", "/x/..%2flogin/admin", "/login/admin%2fuser?name=alice",
             "/login/admin/user%3fname=alice", "/login/%2e/admin", "/login/admin/./", "/login/admin/history/"]


def test_no_path_spelling_shows_the_household_to_a_non_admin_or_nobody(rig):
    """HELD. through every proxy, no spelling of the admin address (encoded letters or slashes, dot
    segments, case, ;params, double slashes) shows the household's page, or anything an admin
    page holds, to a signed-in non-admin (403 "Not an admin", a 404, or the app) or to a visitor
    without a session (the login page). forward-auth decides on the decoded path it was given,
    and every path it owns asks who first."""
    for host, service in rig.logins:
        bob = sign_in_for_admin(rig, host, service, "bob")
        assert "auth_token_admin" not in bob  # not an admin: no admin cookie either
        for path in SPELLINGS:
            for who, jar in (("bob", bob), ("nobody", {})):
                reply = get(rig, host, path, jar)
                body = reply.body
                assert HOUSEHOLD not in body and b"Manage the household" not in body, (rig.kind, host, path, who)
                assert b"alice" not in body, (rig.kind, host, path, who)  # nobody else's name, row or history
                if reply.status == 200 and b"<pre id=seen>" in body:
                    assert "auth_token" not in (reply.seen["cookie"] or "") or rig.kind == "traefik", (path, who)


def test_a_non_admin_cannot_change_anything_at_any_admin_address(rig):
    """HELD. a non-admin's session with a well-formed form (its own CSRF token from the login page,
    the page's own Origin) is refused 403 at every admin address through every proxy, and no
    invitation is made."""
    for host, service in rig.logins:
        bob = sign_in_for_admin(rig, host, service, "bob")
        for path in ("/login/admin", "/login/admin/", "/login/%61dmin", "/login%2fadmin", "/login/admin/user?name=bob"):
            name = next(NAMES)
            reply = post(rig, host, path, bob, {"action": "invite", "user": name, "csrf": "x" * 43})
            assert reply.status in (403, 404) or e.reached_app(reply), (rig.kind, host, path, reply.status)
            assert not exists(service, name)


def test_a_signed_out_or_stale_session_gets_no_admin_page(rig):
    """HELD. through every proxy, an admin's cookies after /logout (session and admin cookie both
    kept by a thief) land on the login page; after ADMIN_FRESH_SECONDS the admin cookie is stale
    and the page asks for a fresh code, and a change is refused."""
    for host, service in rig.logins:
        jar = sign_in_for_admin(rig, host, service)
        csrf = admin_csrf(rig, host, jar)
        # Stale: 601 s later.
        service.clock.advance(service.app.settings.admin_fresh + 1)
        stale = get(rig, host, ADMIN, jar)
        assert stale.status == 200 and HOUSEHOLD not in stale.body and b'name="otp"' in stale.body
        name = next(NAMES)
        refused = post(rig, host, ADMIN, jar, {"action": "invite", "user": name, "csrf": csrf})
        assert refused.status == 403 and not exists(service, name)
        # Signed out: the same cookies (a copy) are nobody's.
        jar = sign_in_for_admin(rig, host, service)
        copy = dict(jar)
        out = rig.proxy.request("GET", host, "/logout", headers={"Cookie": cookie_header(jar)})
        assert out.status in (200, 302, 303), out.status
        after = get(rig, host, ADMIN, copy)
        assert after.status == 302 and "/login?next=" in after.header("Location"), (after.status, after.body[:200])
        name = next(NAMES)
        refused = post(rig, host, ADMIN, copy, {"action": "invite", "user": name, "csrf": csrf})
        assert refused.status in (303, 403) and not exists(service, name)


# --- Forged forwarding headers: the same-origin check and the invitation link -------------

FORGED = {"X-Forwarded-Host": "evil.example.net", "X-Forwarded-Proto": "https",
          "X-Original-URL": "https://evil.example.net/login/admin", "X-Forwarded-Uri": "/login/admin",
          "Forwarded": "host=evil.example.net;proto=https", "X-Forwarded-Server": "evil.example.net",
          "X-Host": "evil.example.net", "X-Forwarded-Port": "443"}


def test_a_forged_forwarding_header_never_moves_the_invitation_link(rig):
    """HELD. the invitation link the admin page builds points at the login host the proxy routed
    by (APP, AUTH; APP1 behind Traefik, with its port), through every proxy, even when the admin's
    request carries a forged X-Forwarded-Host/-Proto, X-Original-URL, Forwarded, X-Host: each
    proxy overwrites or drops them before forward-auth. (A link on an attacker's host would hand
    them the invitation token.)"""
    for host, service in rig.logins:
        jar = sign_in_for_admin(rig, host, service)
        csrf = admin_csrf(rig, host, jar)
        name = next(NAMES)
        reply = post(rig, host, ADMIN, jar, {"action": "invite", "user": name, "csrf": csrf}, headers=FORGED)
        link = invitation_link(rig, host, jar, reply)
        assert link.startswith(f"http://{host}:{rig.port}/login?invite="), (rig.kind, link)
        # A Host with another port or a trailing dot, as a client may write it: never another host.
        csrf = admin_csrf(rig, host, jar)
        name = next(NAMES)
        reply = post(rig, host, ADMIN, jar, {"action": "invite", "user": name, "csrf": csrf},
                     headers={"Host": f"{host.upper()}:{rig.port}"}, origin=rig.origin(host))
        if reply.status == 303:
            assert urllib.parse.urlsplit(invitation_link(rig, host, jar, reply)).hostname == host


def test_a_forged_x_forwarded_host_does_not_make_another_origin_same_origin(rig):
    """HELD. a POST whose Origin is another host, with X-Forwarded-Host (and -Proto) forged to that
    host so that forward-auth's own origin would agree, is refused 403 through every proxy: the
    proxy's X-Forwarded-Host wins. Sibling subdomains (APP2 for AUTH, APP2 for APP1) too."""
    for host, service in rig.logins:
        jar = sign_in_for_admin(rig, host, service)
        csrf = admin_csrf(rig, host, jar)
        for other in ("http://evil.example.net", f"http://{APP2}:{rig.port}", f"https://{host}:{rig.port}",
                      f"http://{host}", "null"):
            forged_host = urllib.parse.urlsplit(other).netloc or host
            name = next(NAMES)
            reply = post(rig, host, ADMIN, jar, {"action": "invite", "user": name, "csrf": csrf}, origin=other,
                         headers={"X-Forwarded-Host": forged_host, "X-Forwarded-Proto": other.split(":")[0],
                                  "X-Original-URL": other + ADMIN})
            assert reply.status == 403 and not exists(service, name), (rig.kind, host, other, reply.status)
        # Fetch Metadata from a sibling subdomain, with the page's own Origin forged beside it.
        name = next(NAMES)
        reply = post(rig, host, ADMIN, jar, {"action": "invite", "user": name, "csrf": csrf},
                     headers={"Sec-Fetch-Site": "same-site"})
        assert reply.status == 403 and not exists(service, name)


def test_absolute_form_request_lines_never_move_the_admin_page_to_an_apps_host(rig_cn):
    """HELD. on the shared login host, a request line naming one host and a Host header naming
    another is judged by the host the proxy routed by: `GET http://app1…/login/admin` with
    Host: auth is app1's own path (the app, none of forward-auth's cookies), and
    `POST http://auth…/login/admin` with Host: app1 and Origin app1 is refused (the origin
    forward-auth compares is the routed one)."""
    rig = rig_cn
    service = rig.proxy.shared
    jar = sign_in_for_admin(rig, AUTH, service)
    cookies = f"Cookie: {cookie_header(domain_cookies(jar))}\r\n"
    to_app = e.raw_exchange(rig.port, f"GET http://{APP1}:{rig.port}{ADMIN} HTTP/1.1", f"{AUTH}:{rig.port}",
                            cookies)
    assert HOUSEHOLD not in to_app.body and b"Manage the household" not in to_app.body
    if e.reached_app(to_app):
        assert "auth_token" not in (to_app.seen["cookie"] or "")
    csrf = admin_csrf(rig, AUTH, jar)
    name = next(NAMES)
    body = urllib.parse.urlencode({"action": "invite", "user": name, "csrf": csrf})
    status, _, _ = raw(rig.port, f"POST http://{AUTH}:{rig.port}{ADMIN} HTTP/1.1\r\nHost: {APP1}:{rig.port}\r\n"
                       f"Cookie: {cookie_header(jar)}\r\nOrigin: http://{APP1}:{rig.port}\r\n"
                       "Content-Type: application/x-www-form-urlencoded\r\n"
                       f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}")
    assert 400 <= status < 500 and not exists(service, name), status


def test_the_admin_page_never_answers_on_an_apps_host_behind_the_shared_login(rig_cn):
    """HELD. with the shared login host, /login/admin (and its spellings) on app1/app2 is
    forward-auth's through Caddy and nginx (their app hosts route /login/... to it, as an old link
    to an app's /login must work: it refuses the admin page there, 404), and no admin page is
    served on an app origin. (Before 4.0's first week Caddy's app hosts passed these paths to the
    app, with none of forward-auth's cookies.)"""
    rig = rig_cn
    jar = sign_in_for_admin(rig, AUTH, rig.proxy.shared)
    for app_host in (APP1, APP2):
        for path in ("/login/admin", "/login/admin/user?name=alice", "/login/%61dmin", "/login/admin%2f"):
            reply = get(rig, app_host, path, domain_cookies(jar))
            assert HOUSEHOLD not in reply.body and b"Manage the household" not in reply.body, (app_host, path)
            seen = e.reached_app(reply)
            assert seen is None and 300 <= reply.status < 500, (app_host, path, reply.status)


# --- Upgrades on the admin page -------------------------------------------------------------


def test_no_upgrade_is_accepted_on_the_admin_page(rig):
    """HELD. an h2c upgrade (Caddy's shared login host block has no @h2c guard: waitress just
    answers HTTP/1.1) and a WebSocket handshake on /login/admin, with an admin's cookies, never get
    a 101 through any proxy."""
    for host, service in rig.logins:
        jar = sign_in_for_admin(rig, host, service)
        cookies = f"Cookie: {cookie_header(jar)}\r\n"
        for path in (ADMIN, ADMIN + "/history", "/login/admin/..%2f..%2fws"):
            status, _, _ = e.h2c_attempt(rig.port, host, path, "/second", headers=cookies)
            assert status != 101, (rig.kind, host, path, "h2c")
            if "%2f" in path and rig.kind != "traefik":
                continue  # the app's (the encoded-slash HOLE above): a WebSocket the app may accept
            status, _ = e.websocket_attempt(rig.port, host, path, headers=cookies)
            assert status != 101, (rig.kind, host, path, "ws")


# --- Chromium: cross-site and sibling-subdomain forms, frames --------------------------------


def attacker_page(context, url, body):
    """Serve `body` at `url` in this browser (an attacker's page on that origin)."""
    context.route(url, lambda route: route.fulfill(status=200, content_type="text/html", body=body))


def auto_submit(action, fields):
    inputs = "".join(f'<input type="hidden" name="{k}" value="{html.escape(v)}">' for k, v in fields.items())
    return (f'<!doctype html><form id=f method=post action="{action}">{inputs}</form>'
            "<script>document.getElementById('f').submit()</script>")


def test_a_sibling_subdomain_cannot_post_to_the_shared_login_hosts_admin_page(rig_cn, browser):  # noqa: F811
    """HELD. a page on app2.example.test (a compromised app) that plants cookies for the whole
    domain and auto-submits the invite form to auth's admin page, even with the admin's real
    CSRF token (as if leaked), is refused 403 in Chromium: the browser sends the session and the
    SameSite=Strict admin cookie (same site), but Sec-Fetch-Site says same-site, not
    same-origin, and Origin names app2. No invitation is made."""
    rig = rig_cn
    service = rig.proxy.shared
    context = browser.new_context()
    try:
        page = context.new_page()
        sign_in_in_chromium(page, rig, AUTH, service)
        csrf = csrf_token_of(page.content())
        name = next(NAMES)
        evil = rig.url(APP2, "/evil-" + name)
        attacker_page(context, evil, "<script>document.cookie='auth_token_csrf=planted; domain=" + DOMAIN +
                      "; path=/'; document.cookie='auth_token_admin=planted; domain=" + DOMAIN +
                      "; path=/login/admin'</script>" + auto_submit(rig.url(AUTH, ADMIN), {
                          "csrf": csrf, "action": "invite", "user": name}))
        with page.expect_navigation(url=re.compile(re.escape(rig.url(AUTH, ADMIN)))) as navigation:
            page.goto(evil)
        response = navigation.value
        assert response.status == 403, response.status
        assert not exists(service, name)
    finally:
        context.close()


def test_a_cross_site_page_cannot_post_to_the_same_host_admin_page(rig, browser):  # noqa: F811
    """HELD. a page on another site auto-submitting the invite form (with a leaked CSRF token) to
    the same-host admin page gets no change through any proxy: the admin cookie is SameSite=Strict
    and the session Lax (neither sent on a cross-site POST), and Sec-Fetch-Site is cross-site."""
    host, service = rig.same_host
    context = browser.new_context()
    try:
        page = context.new_page()
        sign_in_in_chromium(page, rig, host, service)
        csrf = csrf_token_of(page.content())
        name = next(NAMES)
        evil = "http://evil.invalid/" + name
        attacker_page(context, evil, auto_submit(rig.url(host, ADMIN), {"csrf": csrf, "action": "invite",
                                                                       "user": name}))
        posts = []
        page.on("request", lambda r: posts.append(r) if r.method == "POST" else None)
        with page.expect_navigation(url=re.compile(re.escape(rig.origin(host)))):
            page.goto(evil)
        page.wait_for_load_state("load")
        assert len(posts) == 1 and posts[0].url == rig.url(host, ADMIN), [r.url for r in posts]  # it was sent
        assert not exists(service, name)
        assert HOUSEHOLD.decode() not in page.content()
    finally:
        context.close()


def test_the_admin_page_cannot_be_framed(rig, browser):  # noqa: F811
    """HELD. through every proxy every admin answer (the page, the code form, 403, 404, the 303)
    carries X-Frame-Options: DENY, frame-ancestors 'none' and Cache-Control: no-store (no proxy
    strips them), and in Chromium a same-site page (app2) or another site framing the admin page
    of a signed-in, fresh admin renders nothing of it."""
    for host, service in rig.logins:
        jar = sign_in_for_admin(rig, host, service)
        bob = sign_in_for_admin(rig, host, service, "bob")
        csrf = admin_csrf(rig, host, jar)
        stale = {k: v for k, v in jar.items() if k != "auth_token_admin"}
        for reply in (get(rig, host, ADMIN, jar), get(rig, host, ADMIN, stale), get(rig, host, ADMIN, bob),
                      get(rig, host, ADMIN + "/nothing", jar),
                      post(rig, host, ADMIN, jar, {"action": "invite", "user": next(NAMES), "csrf": csrf})):
            assert reply.header("X-Frame-Options") == "DENY", (rig.kind, reply.status)
            assert "frame-ancestors 'none'" in (reply.header("Content-Security-Policy") or ""), reply.status
            assert reply.header("Cache-Control") == "no-store", reply.status
    host, service = rig.logins[-1]
    context = browser.new_context()
    try:
        page = context.new_page()
        sign_in_in_chromium(page, rig, host, service)
        for framer in (rig.url(APP2, "/frame-" + next(NAMES)), "http://evil.invalid/frame"):
            attacker_page(context, framer, f'<!doctype html><iframe id=x src="{rig.url(host, ADMIN)}"></iframe>')
            page.goto(framer)
            page.wait_for_load_state("load")
            assert len(page.frames) == 2, page.frames  # the frame was there; what did it render?
            for frame in page.frames[1:]:
                try:
                    content = frame.content()
                except Exception:  # noqa: BLE001 - a blocked frame may be gone
                    content = ""
                assert "Invite someone" not in content and "Manage the household" not in content, framer
    finally:
        context.close()
