"""Red team: the proxy round (nginx include snippets, the Nginx Proxy Manager recipe, Traefik's static
and shared-login files with strip-authorization, the login host's `/` and the app hosts' `/login`
routed to forward-auth everywhere), attacked through real nginx, Caddy and Traefik on loopback.

A subagent given README and SPEC wrote these. HOLE: the attack worked when written (3 holes, fixed:
the NPM challenge exception opening the app on a host without NPM's challenge location, the nginx app
snippet failing open without the server snippet, a client's own X-Forwarded-*/X-Real-IP reaching the
app through nginx, NPM and Caddy); HELD: the defence held. The harness is test_e2e's and test_e2e_proxies's (the
shipped files with ports and host names swapped, NPM's rendering of a proxy host); every process
is stopped by its pid; nothing waits for time, only for answers (with deadlines).
"""

import base64
import os
import re
import socket
import time
import urllib.parse

import pytest

import test_e2e as e
import test_e2e_proxies as p
from test_e2e import (  # noqa: F401 - fixtures
    APP,
    APP1,
    APP2,
    AUTH,
    STRIPPED,
    hyper,
    marker,
    raw_exchange,
    raw_lines,
    raw_request,
    reached_app,
    single,
    tmp,
    upstream,
)

# --- The proxies ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["caddy", "nginx", "traefik-shared"])
def shared_proxy(request, tmp, single, upstream):  # noqa: F811
    """A shipped config with its shared-login variant (login host AUTH, apps APP1/APP2) in front
    of the echo app; Caddy's and nginx's also serve APP with the per-app login."""
    running = e.start_proxy(request.param, tmp, single, upstream, name=f"rt-{request.param}")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def npm(tmp, upstream):  # noqa: F811
    """The NPM recipe as test_e2e_proxies renders it: APP (as the recipe says), APP1 (Cache Assets
    and Websockets Support on), both with NPM's Let's Encrypt challenge location."""
    running = p.start_npm(tmp, upstream, "rt-npm")
    yield running
    running.stop()
    running.single.stop()


ACME_INCLUDE = "  include conf.d/include/letsencrypt-acme-challenge.conf;\n"


@pytest.fixture(scope="module")
def npm_without_acme(tmp, upstream):  # noqa: F811
    """The same hosts as NPM renders them without a Let's Encrypt certificate (HTTP only, or a
    Custom certificate): NPM's template includes its challenge location only with a Let's Encrypt
    certificate (_certificates.conf)."""
    original = p.npm_proxy_host
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(p, "npm_proxy_host", lambda *args, **kwargs: original(*args, **kwargs).replace(ACME_INCLUDE, ""))
        running = p.start_npm(tmp, upstream, "rt-npm-no-acme")
    yield running
    running.stop()
    running.single.stop()


@pytest.fixture(scope="module", params=["caddy", "nginx", "npm", "traefik-shared"])
def hyper_proxy(request, tmp, single, hyper):  # noqa: F811
    """A shipped config in front of hypercorn, which records every header line the app received."""
    if request.param == "npm":
        running = p.start_npm(tmp, hyper, "rt-npm-hyper")
        yield running
        running.stop()
        running.single.stop()
        return
    running = e.start_proxy(request.param, tmp, single, hyper, name=f"rt-{request.param}-hyper")
    yield running
    running.stop()


def hosts_of(proxy):
    """The app hosts a proxy fixture serves: (host, the forward-auth that judges it)."""
    if proxy.kind == "npm":
        return [APP, APP1]
    if proxy.kind.startswith("traefik"):
        return [APP1]
    return [APP, APP1]


def session_for(proxy, host):
    return e.signed_in_through(proxy, host, "/rt").cookie("auth_token")


# --- HOLE: Nginx Proxy Manager's Let's Encrypt exception without NPM's challenge location ------


def test_npm_acme_exception_never_opens_the_app_on_a_host_without_npms_challenge_location(npm_without_acme):
    """HOLE: npm-advanced.conf makes the *check* answer 204 for any request whose URI looks like a
    challenge token (`if ($request_uri ~ "^/\\.well-known/acme-challenge/[A-Za-z0-9_-]+$") { return
    204; }` in /forward-auth-check), trusting that NPM's own `location ^~ /.well-known/acme-challenge/`
    serves it. NPM renders that location only for a Let's Encrypt certificate; on a proxy host
    that is HTTP only (a LAN host) or has a Custom certificate, the request falls into the recipe's
    `location /` and reaches the app with no check at all, for anyone on the internet: e.g.
    GET /.well-known/acme-challenge/api-v1_users. SPEC: no request reaches an app unchecked.
    Fix: in the recipe's `location /`, refuse what only NPM's challenge location may serve
    (`if ($request_uri ~ "^/\\.well-known/acme-challenge/") { return 404; }`: rewrite phase, so
    before the check), or say the recipe needs a Let's Encrypt certificate and test without one."""
    proxy = npm_without_acme
    for host in (APP, APP1):
        assert "letsencrypt-acme-challenge" not in proxy.rendered[host]
        control = raw_request(proxy.port, host, marker("checked"))
        assert control.status == 302 and reached_app(control) is None  # everything else is checked
        for token in (p.ACME_TOKEN, "anything", "api-v1_users", "admin"):
            path = f"/.well-known/acme-challenge/{token}"
            reply = raw_request(proxy.port, host, path, headers="Remote-User: admin\r\n")
            seen = reached_app(reply)
            assert seen is None, (host, path, reply.status, seen and seen["path"])


# --- HOLE: the app snippet on its own fails open --------------------------------------------


def snippet_alone_config(folder, port, app_port):
    return f"""include forward-auth/forward-auth.conf;
server {{
    listen 127.0.0.1:{port} default_server;
    server_name _;
    return 421;
}}
server {{
    listen 127.0.0.1:{port};
    server_name {APP};
    location / {{
        include forward-auth/forward-auth-app.conf;
        proxy_pass http://127.0.0.1:{app_port};
    }}
}}
"""


def test_the_nginx_app_snippet_without_the_server_snippet_fails_closed(tmp, single, upstream):  # noqa: F811
    """HOLE: forward-auth-app.conf says it is "for inside the location that passes to the app"
    (its header shows `location / { include …app.conf; proxy_pass … }`) and never that the server
    needs forward-auth-server.conf. Without it nginx starts without a word, and auth_request's
    subrequest to /forward-auth-check matches the app's own `location /` (subrequests skip the
    access phase): it is proxied to the *app*, whose 200 (any SPA's catch-all, a 200 page) lets every
    request in, anonymously. The old single-file config could not be split this way; the include
    layout makes a fail-open configuration one forgotten line away. Fix: make the app snippet fail
    closed on its own, e.g. first line `if ($uri = /forward-auth-check) { return 403; }` (measured: a
    403 for everyone without the server snippet, unchanged logins with it), and say in its header
    that the server block needs forward-auth-server.conf."""
    folder = os.path.join(tmp, f"rt-snippet-alone-{e.free_port()}")
    os.makedirs(folder)
    os.chmod(folder, 0o755)
    e.nginx_files(folder, single.port)

    def launch():
        port = e.free_port()
        return port, e.Launched("nginx", folder, e.nginx_http(folder, snippet_alone_config(folder, port, upstream.port)),
                                port)

    try:
        port, launched = e.started(launch)
    except AssertionError as refused:  # nginx refusing such a config is safe too
        assert "did not start" in str(refused)
        return
    try:
        for path in (marker("snippet-alone"), marker("snippet-alone") + "?x=1"):
            reply = raw_request(port, APP, path, headers="Remote-User: admin\r\n")
            assert reached_app(reply) is None and not e.app_saw(path), (path, reply.status)
    finally:
        launched.stop()


# --- HOLE: a client's own address headers reach the app through nginx (and X-Real-IP via Caddy) --

ADDRESS_FORGERIES = ["X-Forwarded-For: 192.168.1.10", "X-Real-IP: 192.168.1.10",
                     "X-Forwarded-Host: evil.example.net", "X-Forwarded-Proto: https"]


def forged_addresses(seen, host, port):
    """The address headers the app got that are the client's word, not the proxy's: an
    X-Forwarded-For whose right-most hop is not the real peer, an X-Real-IP that is not the peer,
    an X-Forwarded-Host that is not the routed host, an X-Forwarded-Proto other than http."""
    wrong = []
    for name, value in seen["headers"]:
        if name == "x-forwarded-for" and value.split(",")[-1].strip() != "127.0.0.1" or name == "x-real-ip" and value.strip() != "127.0.0.1" or name == "x-forwarded-host" and value.lower() not in (host, f"{host}:{port}") or name == "x-forwarded-proto" and value.lower() != "http":
            wrong.append((name, value))
    return wrong


def address_reply(proxy, host, cookie):
    return raw_lines(proxy.port, ["GET /address HTTP/1.1", f"Host: {host}:{proxy.port}", f"Cookie: {cookie}",
                                  "Accept: text/html", *ADDRESS_FORGERIES, "Connection: close"])


@pytest.mark.parametrize("hyper_proxy", ["nginx", "npm", "caddy"], indirect=True)
def test_the_app_never_gets_a_clients_own_address_headers(hyper_proxy):
    """HOLE: nginx passes every client header it is not told to set. forward-auth-app.conf sets
    none of the address headers, so the app receives the client's own `X-Forwarded-For:
    192.168.1.10`, `X-Real-IP`, `X-Forwarded-Host: evil.example.net` and `X-Forwarded-Proto`
    verbatim (measured: exactly as sent). The NPM recipe's `location /` sets X-Forwarded-For and
    -Proto but passes a client's X-Real-IP and X-Forwarded-Host (NPM's own proxy.conf, which the
    recipe replaces, sets `X-Real-IP $remote_addr` in current NPM). Caddy replaces XFF/-Host/-Proto
    but passes X-Real-IP. Traefik replaces all four (HELD below). Apps the household puts behind
    and tells to trust the proxy's address (127.0.0.1) then take the client's word for its address
    and host: Home Assistant's `trusted_networks` login (no password from "the LAN") with
    `use_x_forwarded_for`, Vaultwarden's `IP_HEADER=X-Real-IP` login throttling, Nextcloud's
    brute-force protection, fail2ban on app logs, password-reset links built from
    X-Forwarded-Host. Fix: forward-auth-app.conf (and the NPM recipe's location /)
    `proxy_set_header X-Forwarded-For $remote_addr; X-Real-IP $remote_addr; X-Forwarded-Proto
    $scheme; X-Forwarded-Host $forward_auth_host;`; the Caddy snippets `header_up X-Real-IP
    {remote_host}`."""
    proxy = hyper_proxy
    problems = {}
    for host in hosts_of(proxy):
        reply = address_reply(proxy, host, session_for(proxy, host))
        seen = reached_app(reply)
        assert seen and seen["remote_user"] == ["alice"], (proxy.kind, host, reply.status)
        if wrong := forged_addresses(seen, host, proxy.port):
            problems[host] = wrong
    assert not problems, (proxy.kind, problems)


@pytest.mark.parametrize("hyper_proxy", ["traefik-shared"], indirect=True)
def test_traefik_replaces_every_client_address_header(hyper_proxy):
    """HELD: Traefik's entry point (no forwardedHeaders.trustedIPs) drops a client's X-Forwarded-*
    and X-Real-IP and sets its own: the app behind traefik.shared-login.yml sees the real peer and
    the routed host. (A client's RFC 7239 `Forwarded` passes through every proxy; no app the
    README names reads it.)"""
    proxy = hyper_proxy
    reply = address_reply(proxy, APP1, session_for(proxy, APP1))
    seen = reached_app(reply)
    assert seen and seen["remote_user"] == ["alice"], reply.status
    assert not forged_addresses(seen, APP1, proxy.port), seen["headers"]


# --- HELD: the admin page never answers on an app host -------------------------------------------


def test_the_admin_page_answers_on_the_login_host_only_whatever_the_client_claims(shared_proxy):
    """HELD: every shared-login config now routes the app hosts' /login/… to forward-auth, so
    app1.example.com/login/admin reaches it. It answers 404 there (the page would share the app's
    origin, and a script the app serves could drive it), also when the client (or that app's own
    script, which may set any of these headers on a same-origin fetch) claims the login host in
    X-Forwarded-Host, Forwarded, X-Original-URL or an absolute-form target: Caddy, nginx and
    Traefik each put the host they routed by in X-Forwarded-Host."""
    proxy = shared_proxy
    e.make_admin_of(proxy.shared)
    cookie = session_for(proxy, APP1)
    port = proxy.port
    own = proxy.request("GET", AUTH, "/login/admin", headers={"Cookie": cookie, "Accept": "text/html"})
    assert own.status == 200 and b"upstream" not in own.body, own.status  # the page exists, on its host
    claims = [{}, {"X-Forwarded-Host": f"{AUTH}:{port}"}, {"X-Forwarded-Host": AUTH},
              {"Forwarded": f"host={AUTH}:{port};proto=http"}, {"X-Original-URL": f"http://{AUTH}:{port}/login/admin"},
              {"X-Forwarded-Host": f"{AUTH}:{port}", "X-Forwarded-Proto": "http", "X-Forwarded-Port": str(port)}]
    for host in (APP1, APP2):
        for claim in claims:
            for path in ("/login/admin", "/login/admin/user?name=bob", "/login/admin/history"):
                reply = proxy.request("GET", host, path, headers={"Cookie": cookie, "Accept": "text/html", **claim})
                assert reply.status == 404 and b"Manage the household" not in reply.body, (host, path, claim, reply.status)
                assert b"upstream" not in reply.body
        line = raw_exchange(port, f"GET http://{host}:{port}/login/admin HTTP/1.1", f"{AUTH}:{port}", f"Cookie: {cookie}\r\n")
        assert line.status == 404, (host, line.status)


# --- HELD: the new redirects go to the login host only ----------------------------------------------


def location_of(proxy, reply, base_host):
    return urllib.parse.urlsplit(urllib.parse.urljoin(proxy.url(base_host, "/"), reply.header("Location") or ""))


def test_root_and_the_app_hosts_login_only_ever_redirect_to_the_login_page(shared_proxy):
    """HELD: GET / on the login host and GET /login (and /logout) on an app host answer 302 to
    LOGIN_URL itself, whatever Host, X-Forwarded-Host, Forwarded, X-Original-URL or absolute-form
    target the client sends; the query goes along re-encoded (no CR/LF header injection) and a
    hostile `next` in it is judged by the login host: a login there never lands on evil.example.net."""
    proxy = shared_proxy
    port = proxy.port
    login = f"{AUTH}:{port}"
    hostile = {"X-Forwarded-Host": "evil.example.net", "Forwarded": "host=evil.example.net",
               "X-Original-URL": "http://evil.example.net/", "X-Forwarded-Proto": "https", "Accept": "text/html"}
    for host, path in ((AUTH, "/"), (APP1, "/login"), (APP2, "/login?next=https%3A%2F%2Fevil.example.net%2F"),
                       (APP1, "/login?redirect_uri=//evil.example.net&x=%0d%0aSet-Cookie:%20auth_token=x"),
                       (APP1, "/logout?next=https%3A%2F%2Fevil.example.net%2F")):
        reply = proxy.request("GET", host, path, headers=hostile)
        assert reply.status == 302, (host, path, reply.status)
        location = location_of(proxy, reply, host)
        assert location.netloc == login and location.path == "/login", (host, path, reply.header("Location"))
        assert not any(k.lower() == "set-cookie" and "auth_token=x" in v for k, v in reply.headers), (host, path)
    for line, host_header in ((f"GET http://{AUTH}:{port}/ HTTP/1.1", "evil.example.net"),
                              (f"GET http://{APP1}:{port}/login HTTP/1.1", "evil.example.net"),
                              ("GET / HTTP/1.1", f"{AUTH}:{port}\r\nX-Forwarded-Host: evil.example.net")):
        reply = raw_exchange(port, line, host_header)
        assert reply.status == 302 and location_of(proxy, reply, AUTH).netloc == login, (line, reply.status)
    # The hostile next, followed to the login host and a right code: lands on the login host.
    first = proxy.request("GET", APP1, "/login?next=https%3A%2F%2Fevil.example.net%2Fsteal", headers=hostile)
    location = location_of(proxy, first, APP1)
    done = e.login_through(proxy, AUTH, e.login_path_of(location), proxy.shared.code())
    assert done.status == 302 and done.cookie("auth_token")
    landed = location_of(proxy, done, AUTH)
    assert landed.netloc == login and "evil" not in done.header("Location"), done.header("Location")


# --- HELD: forward-auth's own routes lead to nothing else of forward-auth's --------------------------

INTERNAL_PATHS = ["/metrics/..", "/login/..%2fmetrics", "/login%2f..%2fmetrics", "/login/%2e%2e/metrics",
                  "/login/../metrics", "/%2e/metrics", "/metrics%2f..", "//metrics", "/health/..", "/verify/..",
                  "/auth/..", "/login/..%2fverify", "/login/..%2fauth", "/logout/..%2fhealth",
                  "/login/admin/..%2f..%2fmetrics", "/%6cogin/..%2fmetrics", "/login/..;/metrics"]


def assert_not_forward_auths_internals(reply, case):
    assert b"# HELP" not in reply.body and b"forward_auth_" not in reply.body, case
    assert b'{"status"' not in reply.body, case
    assert not any(k.lower() == "remote-user" for k, _ in reply.headers), case  # /verify's or /auth's 200


def test_no_path_through_the_login_routes_reaches_metrics_health_or_the_check(shared_proxy, npm):
    """HELD: the routes now sent to forward-auth on every host (the login host's `/`, `/login`,
    `/login/…`, `/logout` on app hosts too) never reach /metrics, /health, /verify or /auth: Caddy,
    nginx and Traefik match the cleaned path but forward the raw one, and waitress does not resolve
    dot segments, so `/login/..%2fmetrics` is forward-auth's 404 (or the checked app)."""
    for proxy, hosts in ((shared_proxy, (AUTH, APP1, APP)), (npm, (APP, APP1))):
        for host in hosts:
            if proxy.kind.startswith("traefik") and host == APP:
                continue
            for path in INTERNAL_PATHS:
                reply = raw_exchange(proxy.port, f"GET {path} HTTP/1.1", f"{host}:{proxy.port}")
                assert_not_forward_auths_internals(reply, (proxy.kind, host, path, reply.status))
                assert reached_app(reply) is None, (proxy.kind, host, path)  # no session: never the app


# --- HELD: the check's own locations are not reachable from outside -----------------------------

# Spellings nginx normalises to /forward-auth-check (decoded, slashes merged, dot segments resolved).
INTERNAL_CHECK_PATHS = ["/forward-auth-check", "//forward-auth-check", "/%66orward-auth-check",
                        "/forward-auth-check?next=/x", "/./forward-auth-check", "/x/../forward-auth-check",
                        "/x/..%2fforward-auth-check", "/forward%2dauth%2dcheck"]
# Spellings that are the app's location (checked).
OTHER_CHECK_PATHS = ["/FORWARD-AUTH-CHECK", "/forward-auth-check/", "/forward-auth-checkx"]


def test_the_check_location_and_the_named_login_location_are_internal(shared_proxy, npm):
    """HELD: `location = /forward-auth-check` is `internal` in forward-auth-server.conf and in the NPM
    text: every spelling nginx normalises to it is a 404 from outside (never forward-auth's /auth
    answer with its Remote-* headers or login Location), with or without a session; near misses
    are the app's location, checked. `@forward_auth_login` cannot be named in a request line."""
    proxies = [npm] + ([shared_proxy] if shared_proxy.kind == "nginx" else [])
    for proxy in proxies:
        hosts = (APP, APP1) + ((AUTH,) if proxy.kind == "nginx" else ())
        cookie = session_for(proxy, APP)
        for host in hosts:
            for path in INTERNAL_CHECK_PATHS + OTHER_CHECK_PATHS:
                for headers in ("", f"Cookie: {cookie}\r\n"):
                    reply = raw_exchange(proxy.port, f"GET {path} HTTP/1.1", f"{host}:{proxy.port}", headers)
                    case = (proxy.kind, host, path, bool(headers), reply.status)
                    assert not any(k.lower() == "remote-user" for k, _ in reply.headers), case
                    assert b"Unauthorized" not in reply.body, case
                    if path in INTERNAL_CHECK_PATHS:
                        assert reply.status == 404 and reached_app(reply) is None, case
                    elif not headers:
                        assert reached_app(reply) is None, case
            for line in (f"GET http://{host}:{proxy.port}/forward-auth-check HTTP/1.1", "GET @forward_auth_login HTTP/1.1"):
                reply = raw_exchange(proxy.port, line, f"{host}:{proxy.port}", f"Cookie: {cookie}\r\n")
                assert reply.status in (400, 404) and reached_app(reply) is None, (proxy.kind, host, line, reply.status)


# --- HELD: the NPM recipe judges the host nginx routed by -----------------------------------------


def test_npm_judges_the_routed_host_for_a_restricted_member_in_absolute_form(npm):
    """HELD: a family member allowed APP only, on the NPM hosts (one with Cache Assets, whose regex
    location is checked by the recipe's server-level auth_request): absolute-form targets naming
    APP1 with `Host: APP`, other ports, case, a trailing dot, a Host list, a second Host line, and
    X-Forwarded-Host/X-Original-URL claims are each refused, and the app sees none of them."""
    service = npm.single
    cookie = session_for(npm, APP)
    service.store.set_hosts("alice", [APP])
    service.clock.advance(1)
    port = npm.port
    try:
        allowed = raw_exchange(port, f"GET http://{APP}:{port}{marker('npm-allowed')} HTTP/1.1", f"{APP1}:{port}",
                               f"Cookie: {cookie}\r\n")
        assert reached_app(allowed) and allowed.seen["remote_user"] == ["alice"], allowed.status
        for suffix in ("", ".png"):
            cases = [(f"http://{APP1}:{port}{{p}}", f"{APP}:{port}", ""), (f"http://{APP1}{{p}}", f"{APP}:{port}", ""),
                     (f"http://{APP1.upper()}:{port}{{p}}", f"{APP}:{port}", ""),
                     (f"http://{APP1}.:{port}{{p}}", f"{APP}:{port}", ""), ("{p}", f"{APP1}:1", ""),
                     ("{p}", f"{APP1}.:{port}", ""), ("{p}", f"{APP1}:{port}, {APP}", ""),
                     ("{p}", f"{APP1}:{port}", f"X-Forwarded-Host: {APP}:{port}\r\nX-Original-URL: http://{APP}:{port}/\r\n")]
            for target, host, extra in cases:
                path = marker("npm-refused") + suffix
                reply = raw_exchange(port, f"GET {target.format(p=path)} HTTP/1.1", host, f"Cookie: {cookie}\r\n{extra}")
                assert reached_app(reply) is None and not e.app_saw(path), (target, host, reply.status)
                assert reply.status >= 400, (target, host, reply.status)
    finally:
        service.store.set_hosts("alice", ["*"])
        service.clock.advance(1)


# --- HELD: the challenge exception with NPM's challenge location in place -------------------------


def test_npm_acme_exception_lets_only_a_plain_token_path_through(npm):
    """HELD: with NPM's challenge location (a Let's Encrypt certificate), the recipe's 204 holds for
    the exact token shape of $request_uri only: merged slashes, encoded dots and slashes, a trailing
    slash, `;` parameters, upper case, a query, dot segments out of the folder are checked (a login
    redirect or a 404), the app sees none of them, and NPM's own location serves only its files."""
    token = p.ACME_TOKEN
    for host in (APP, APP1):
        exact = raw_request(npm.port, host, f"/.well-known/acme-challenge/{token}")
        assert exact.status == 200 and exact.body == b"the challenge's answer", (host, exact.status)
        for target in (f"/.well-known/acme-challenge//{token}", f"/.well-known//acme-challenge/{token}",
                       f"//.well-known/acme-challenge/{token}", f"/.well-known/acme-challenge/{token}/",
                       f"/%2ewell-known/acme-challenge/{token}", "/.well-known/acme-challenge/%2e%2e/%2e%2e/x",
                       f"/.well-known/acme-challenge/{token}%2f..%2f..%2fx", f"/.well-known/acme-challenge/{token};x",
                       f"/.WELL-KNOWN/acme-challenge/{token}", f"/.well-known/acme-challenge/{token}?x",
                       "/.well-known/acme-challenge/..", f"/.well-known/acme-challenge/{token}%00",
                       f"/.well-known/acme-challenge/{token}.png", f"/.well-known/acme-challenge/{token}/..%2f..%2fx"):
            reply = raw_request(npm.port, host, target, headers="Remote-User: admin\r\n")
            assert reached_app(reply) is None, (host, target, reply.status)
            assert reply.status in (302, 400, 404), (host, target, reply.status)


# --- HELD: h2c through NPM's server-level WebSocket lines -----------------------------------------


@pytest.mark.parametrize("hyper_proxy", ["npm"], indirect=True)
def test_no_h2c_upgrade_in_any_of_the_recipes_locations_with_websockets_support_on(hyper_proxy, hyper):  # noqa: F811
    """HELD: on the NPM host with Websockets Support on (Upgrade/Connection at server level), an h2c
    upgrade with a session on the recipe's `location /`, its login location and NPM's challenge
    location never becomes an upgraded connection to the app: every location of the recipe sets
    Upgrade from the websocket-only map or passes none; the app never sees the second stream."""
    proxy = hyper_proxy
    cookie = session_for(proxy, APP1)
    for path in ("/page", "/login", f"/.well-known/acme-challenge/{p.ACME_TOKEN}"):
        for upgrade in (("Upgrade: h2c",), ("Upgrade: websocket, h2c",), ("Upgrade: websocket", "Upgrade: h2c")):
            since = len(hyper.seen)
            second = marker("rt-h2c-second")
            status, streams, _ = e.h2c_attempt(proxy.port, APP1, path, second, f"Cookie: {cookie}\r\n", upgrade)
            assert status != 101 and not streams, (path, upgrade, status, streams)
            assert not hyper.unchecked(since, paths=[second]), hyper.seen[since:]


# --- HELD: Traefik's strip-authorization ------------------------------------------------------------


def h2_prior_knowledge(port, host, path, headers):
    """One HTTP/2 stream over plain TCP (Traefik speaks h2c on its entry points): its status."""
    import h2.config
    import h2.connection
    import h2.events

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", f"{host}:{port}"),
                            (":path", path), *headers], end_stream=True)
    status = None
    deadline = time.monotonic() + 15
    with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
        conn.sendall(client.data_to_send())
        while time.monotonic() < deadline:
            conn.settimeout(max(0.05, deadline - time.monotonic()))
            data = conn.recv(65536)
            if not data:
                break
            events = client.receive_data(data)
            for event in events:
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[":status"])
            conn.sendall(client.data_to_send())
            if any(isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated))
                   for ev in events):
                break
    return status


@pytest.mark.parametrize("hyper_proxy", ["traefik-shared"], indirect=True)
def test_traefik_strip_authorization_keeps_every_spelling_of_the_token_from_the_app(hyper_proxy, hyper):  # noqa: F811
    """HELD: behind `strip-client-headers, forward-auth, strip-authorization`, an app token as
    Bearer or Basic still opens the app and the app never receives it: lower-case name, two
    Authorization lines, a Proxy-Authorization copy, `Connection: Authorization`, or HTTP/2 prior
    knowledge (Go canonicalises names; Del removes every line; hop-by-hop names are dropped)."""
    proxy = hyper_proxy
    token = e.app_token(proxy.shared, "rt-strip")
    basic = base64.b64encode(f"alice:{token}".encode()).decode()
    variants = [(["Authorization: Bearer " + token], 200), (["authorization: Bearer " + token], 200),
                (["Authorization: Basic " + basic], 200), (["Authorization: Bearer " + token] * 2, None),
                (["Authorization: Bearer " + token, "Proxy-Authorization: Bearer " + token], 200),
                (["Authorization: Bearer " + token, "X-Note: a"], 200)]
    for lines, status in variants:
        since = len(hyper.seen)
        reply = raw_lines(proxy.port, ["GET /strip HTTP/1.1", f"Host: {STRIPPED}:{proxy.port}", "Accept: */*", *lines,
                                       "Connection: close"])
        assert status is None or reply.status == status, (lines[0][:30], reply.status)
        leaked = [(k, v) for seen in hyper.seen[since:] for k, v in seen["headers"] if token in v or basic in v]
        assert not leaked, (lines, leaked)
    since = len(hyper.seen)
    assert h2_prior_knowledge(proxy.port, STRIPPED, "/strip-h2", [("authorization", "Bearer " + token),
                                                                  ("accept", "*/*")]) == 200
    assert hyper.seen[since:] and not [(k, v) for seen in hyper.seen[since:] for k, v in seen["headers"] if token in v]


# --- HELD: forward-auth's cookies never reach the app (Caddy, nginx, NPM) --------------------------


def test_no_crafted_or_planted_cookie_header_carries_forward_auths_cookies_to_the_app(shared_proxy, npm):
    """HELD: the Cookie header a browser sends, with what a sibling subdomain can plant in it
    (names sent many times, more than five of ours, no space or a tab after `;`), and two Cookie
    lines: the app behind Caddy, nginx and the NPM recipe gets none of auth_token,
    auth_token_device, _csrf, _invite, _admin (Traefik passes them, as documented)."""
    proxies = [npm] + ([shared_proxy] if not shared_proxy.kind.startswith("traefik") else [])
    for proxy in proxies:
        for host in hosts_of(proxy):
            login = e.signed_in_through(proxy, host, "/cookies")
            session, device = login.cookie("auth_token"), login.cookie("auth_token_device")
            planted = "auth_token=x; auth_token=y; auth_token_device=z; auth_token_csrf=w; auth_token_invite=v; auth_token_admin=u"
            headers = [f"a=1;{session}", f"a=1;\t{session};\t{device}", f"{planted}; {session}; b=2",
                       "; ".join([session] * 7), f"{session};auth_token_admin=u;theme=dark;{device}",
                       f"a=1; {session}; {device}; auth_token_lang=x"]
            for cookie in headers:
                reply = proxy.request("GET", host, "/cookies", headers={"Cookie": cookie})
                seen = reached_app(reply)
                assert seen and seen["remote_user"] == ["alice"], (proxy.kind, host, cookie[:40], reply.status)
                kept = seen["cookie"] or ""
                assert not re.search(r"(^|[;,\s])auth_token(_device|_csrf|_invite|_admin)?=", kept), (proxy.kind, host,
                                                                                                      kept)
            reply = raw_lines(proxy.port, ["GET /cookies HTTP/1.1", f"Host: {host}:{proxy.port}", "Cookie: a=1",
                                           f"Cookie: {session}", f"Cookie: {device}", "Connection: close"])
            seen = reached_app(reply)
            if seen:
                assert not re.search(r"(^|[;,\s])auth_token(_device)?=", seen["cookie"] or ""), (proxy.kind, host)


if __name__ == "__main__":
    import sys

    sys.exit(pytest.main([__file__, "-v"]))
