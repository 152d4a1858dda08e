"""End-to-end: the Nginx Proxy Manager recipe (nginx/npm-http_top.conf, nginx/npm-advanced.conf)
in real nginx, laid out as Nginx Proxy Manager lays it out, with Chromium logging in through it.

Nginx Proxy Manager (NPM) renders each proxy host into a server block of its own from its template
(backend/templates/proxy_host.conf): `set $forward_scheme`, `$server` and `$port` from the Details
tab, `listen` and `server_name`, its Let's Encrypt challenge location, "Cache Assets" (a regex
location that includes conf.d/include/proxy.conf), "Block Common Exploits", "Websockets Support"
(Upgrade/Connection lines at server level), the logs, then the "Advanced" tab's text, then, unless
that text has a `location / {` of its own (backend/internal/nginx.js, `use_default_location`), its
default `location /` with proxy.conf: `proxy_set_header` lines of its own, so that nginx passes it
none of the server's. The blocks here are rendered the same way, beside the http-level lines of
NPM's nginx.conf and stand-ins for its include files as NPM ships them; the shipped files go where
NPM includes /data/nginx/custom/http_top.conf and where the Advanced text goes.

Loopback only. The harness (forward-auth on waitress with a FakeClock, the echo app, hypercorn,
Chromium) is test_e2e's; its tests of upgrades, WebSockets, odd requests and forged headers run
here too, on the NPM hosts.
"""

import json
import os
import re
import sys
import urllib.parse

import pytest

import test_e2e as e
from test_e2e import (  # noqa: F401 - fixtures, and test_e2e's attacks run on the hosts below
    APP,
    APP1,
    APP2,
    HERE,
    browser,
    hyper,
    test_a_websocket_opens_with_a_session_and_never_without,
    test_no_client_copy_of_a_header_an_app_trusts_reaches_it,
    test_no_h2c_upgrade_lets_a_request_reach_the_app_unchecked,
    test_no_odd_request_reaches_the_app_unchecked,
    tmp,
    upstream,
)

# --- Nginx Proxy Manager's own pieces, as it ships them ---------------------------------------

# docker/rootfs/etc/nginx/conf.d/include/proxy.conf: NPM's default location / includes it.
NPM_PROXY_CONF = """add_header       X-Served-By $host;
proxy_set_header Host $host;
proxy_set_header X-Forwarded-Scheme $scheme;
proxy_set_header X-Forwarded-Proto  $scheme;
proxy_set_header X-Forwarded-For    $remote_addr;
proxy_pass       $forward_scheme://$server:$port;
"""

# conf.d/include/assets.conf: "Cache Assets".
NPM_ASSETS_CONF = r"""location ~* ^.*\.(css|js|jpe?g|gif|png|woff|eot|ttf|svg|ico|css\.map|js\.map)$ {
	if_modified_since off;

	# use the public cache
	proxy_cache public-cache;
	proxy_cache_key $host$request_uri;

	# ignore these headers for media
	proxy_ignore_headers Set-Cookie Cache-Control Expires X-Accel-Expires;

	# cache 200s and also 404s (not ideal but there are a few 404 images for some reason)
	proxy_cache_valid any 30m;
	proxy_cache_valid 404 1m;

	# strip this header to avoid If-Modified-Since requests
	proxy_hide_header Last-Modified;
	proxy_hide_header Cache-Control;
	proxy_hide_header Vary;

	proxy_cache_bypass 0;
	proxy_no_cache 0;

	proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504 http_404;
	proxy_connect_timeout 5s;
	proxy_read_timeout 45s;

	expires @30m;
	access_log  off;

	include conf.d/include/proxy.conf;
}
"""

# conf.d/include/block-exploits.conf, its first two blocks (the rest test the query string for
# spam words and the User-Agent the same way): "Block Common Exploits".
NPM_BLOCK_EXPLOITS_CONF = r"""## Block SQL injections
set $block_sql_injections 0;

if ($query_string ~ "union.*select.*\(") {
	set $block_sql_injections 1;
}

if ($query_string ~ "union.*all.*select.*") {
	set $block_sql_injections 1;
}

if ($query_string ~ "concat.*\(") {
	set $block_sql_injections 1;
}

if ($block_sql_injections = 1) {
	return 403;
}

## Block file injections
set $block_file_injections 0;

if ($query_string ~ "[a-zA-Z0-9_]=http://") {
	set $block_file_injections 1;
}

if ($query_string ~ "[a-zA-Z0-9_]=(\.\.//?)+") {
	set $block_file_injections 1;
}

if ($query_string ~ "[a-zA-Z0-9_]=/([a-z0-9_.]//?)+") {
	set $block_file_injections 1;
}

if ($block_file_injections = 1) {
	return 403;
}
"""

# conf.d/include/letsencrypt-acme-challenge.conf (comments shortened): every host with a Let's
# Encrypt certificate has it. Its location turns auth_basic off, not auth_request.
NPM_ACME_CONF = """# Rule for legitimate ACME Challenge requests (like /.well-known/acme-challenge/xxxxxxxxx)
location ^~ /.well-known/acme-challenge/ {
	auth_basic off;
	allow all;
	default_type "text/plain";
	root {data}/letsencrypt-acme-challenge;
}

# Hide /acme-challenge subdirectory and return 404 on all requests.
location = /.well-known/acme-challenge/ {
	return 404;
}
"""

# The http {} lines of NPM's nginx.conf that shape a proxy host, in its order (paths under the test's folder).
NPM_HTTP = """    proxy_http_version            1.1;
    proxy_set_header              X-Forwarded-Scheme $scheme;
    proxy_set_header              X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header              Accept-Encoding "";
    proxy_cache                   off;
    proxy_cache_path              {folder}/cache/public  levels=1:2 keys_zone=public-cache:30m max_size=192m;
    log_format proxy '[$time_local] $upstream_cache_status $upstream_status $status - $request_method $scheme $host "$request_uri" [Client $remote_addr] [Length $body_bytes_sent] [Gzip $gzip_ratio] [Sent-to $server] "$http_user_agent" "$http_referer"';
    map $host $forward_scheme {{
        default http;
    }}
    set_real_ip_from 10.0.0.0/8;
    set_real_ip_from 172.16.0.0/12;
    set_real_ip_from 192.168.0.0/16;
    real_ip_header X-Real-IP;
    real_ip_recursive on;
    include {data}/nginx/custom/http_top[.]conf;
    include {folder}/conf.d/*.conf;
    include {data}/nginx/proxy_host/*.conf;
"""

# NPM's default host (conf.d/default.conf): a name no proxy host has.
NPM_DEFAULT_CONF = """server {{
    listen 127.0.0.1:{port} default_server;
    server_name localhost-nginx-proxy-manager;
    location / {{
        return 404;
    }}
}}
"""

# backend/internal/nginx.js: NPM leaves its own `location /` out when the Advanced text has one.
USE_DEFAULT_LOCATION = re.compile(r"^(?:.*;)?\s*?location\s*?/\s*?\{", re.IGNORECASE | re.MULTILINE)


def npm_proxy_host(host_id, domain, port, forward_port, advanced, data, caching=False, websockets=False,
                   block_exploits=True):
    """A proxy host's server block as proxy_host.conf renders it: forwarding to
    http://127.0.0.1:`forward_port`, HTTP only (with the Let's Encrypt challenge location a
    certificate brings), no access list, no custom locations."""
    websocket = ["proxy_set_header Upgrade $http_upgrade;", "proxy_set_header Connection $http_connection;",
                 "proxy_http_version 1.1;"]
    lines = ["# ------------------------------------------------------------", f"# {domain}",
             "# ------------------------------------------------------------", "", "server {",
             "  set $forward_scheme http;", '  set $server         "127.0.0.1";', f"  set $port           {forward_port};",
             "", f"  listen 127.0.0.1:{port};", f"  server_name {domain};",
             "  include conf.d/include/letsencrypt-acme-challenge.conf;"]
    if caching:
        lines += ["  # Asset Caching", "  include conf.d/include/assets.conf;"]
    if block_exploits:
        lines += ["  # Block Exploits", "  include conf.d/include/block-exploits.conf;"]
    if websockets:
        lines += websocket
    lines += ["", f"  access_log {data}/logs/proxy-host-{host_id}_access.log proxy;",
              f"  error_log {data}/logs/proxy-host-{host_id}_error.log warn;", "", advanced, ""]
    if USE_DEFAULT_LOCATION.search(advanced) is None:
        lines += ["  location / {", *(["    " + line for line in websocket] if websockets else []),
                  "    # Proxy!", "    include conf.d/include/proxy.conf;", "  }"]
    lines += ["", "  # Custom", f"  include {data}/nginx/custom/server_proxy[.]conf;", "}", ""]
    return "\n".join(lines)


def shipped(name):
    with open(os.path.join(HERE, "nginx", name)) as file:
        return file.read()


APP_LOCATION = re.compile(r"^location / \{\n(?P<body>.*?)^\}\n", re.MULTILINE | re.DOTALL)


def without_its_own_location(advanced):
    """What the recipe warns against: the Advanced text's `location /` taken apart, its header lines
    put at server level (where they would seem to apply to the whole host). NPM then keeps its own
    location /, whose proxy.conf has proxy_set_header lines of its own."""
    match = APP_LOCATION.search(advanced)
    assert match, "the Advanced text's location /"
    headers = [line.strip() for line in match["body"].splitlines() if line.strip().startswith("proxy_set_header ")]
    return advanced[:match.start()] + "\n".join(headers) + "\n" + advanced[match.end():]


ACME_TOKEN = "Zx9_token-0123456789abcdefABCDEF"


class NpmProxy:
    """Real nginx laid out as Nginx Proxy Manager lays it out, three proxy hosts for the app on `app`:
    APP with the shipped Advanced text and the recipe's toggles (Cache Assets off, Websockets Support
    off, Block Common Exploits on); APP1 the same text with Cache Assets and Websockets Support on;
    APP2 what the recipe warns against (without_its_own_location)."""

    kind = "npm"

    def __init__(self, folder, service, app):
        self.port = free_port = e.free_port()
        self.single = self.shared = service
        data = os.path.join(folder, "data")
        for path in ("nginx/custom", "nginx/proxy_host", "logs", "letsencrypt-acme-challenge/.well-known/acme-challenge"):
            os.makedirs(os.path.join(data, path), exist_ok=True)
        os.makedirs(os.path.join(folder, "conf.d", "include"), exist_ok=True)
        os.makedirs(os.path.join(folder, "cache"), exist_ok=True)  # NPM's image has /var/lib/nginx/cache
        with open(os.path.join(data, "letsencrypt-acme-challenge", ".well-known", "acme-challenge", ACME_TOKEN),
                  "w") as file:
            file.write("the challenge's answer")
        top = shipped("npm-http_top.conf")
        assert top.count("server forward-auth:3000;") == 1
        files = {
            os.path.join(data, "nginx", "custom", "http_top.conf"):
                top.replace("server forward-auth:3000;", f"server 127.0.0.1:{service.port};"),
            os.path.join(folder, "conf.d", "include", "proxy.conf"): NPM_PROXY_CONF,
            os.path.join(folder, "conf.d", "include", "assets.conf"): NPM_ASSETS_CONF,
            os.path.join(folder, "conf.d", "include", "block-exploits.conf"): NPM_BLOCK_EXPLOITS_CONF,
            os.path.join(folder, "conf.d", "include", "letsencrypt-acme-challenge.conf"):
                NPM_ACME_CONF.replace("{data}", data),
            os.path.join(folder, "conf.d", "default.conf"): NPM_DEFAULT_CONF.format(port=free_port),
        }
        advanced = shipped("npm-advanced.conf")
        hosts = [(APP, advanced, {}), (APP1, advanced, {"caching": True, "websockets": True}),
                 (APP2, without_its_own_location(advanced), {})]
        for host_id, (domain, text, toggles) in enumerate(hosts, start=1):
            files[os.path.join(data, "nginx", "proxy_host", f"{host_id}.conf")] = npm_proxy_host(
                host_id, domain, free_port, app.port, text, data, **toggles)
        for path, text in files.items():
            with open(path, "w") as file:
                file.write(text)
        self.rendered = {domain: files[os.path.join(data, "nginx", "proxy_host", f"{i}.conf")]
                         for i, (domain, _, _) in enumerate(hosts, start=1)}
        config = e.nginx_http(folder, NPM_HTTP.format(folder=folder, data=data))
        self.launched = e.Launched("nginx", folder, config, self.port)

    request = e.Proxy.request
    url = e.Proxy.url

    def stop(self):
        self.launched.stop()


def start_npm(tmp, app, name):  # noqa: F811 - the fixture imported above
    e.need(e.nginx_binary(), "nginx is not installed: apt-get install -y nginx")
    service = e.ForwardAuth(tmp)
    folder = os.path.join(tmp, f"{name}-{e.free_port()}")
    os.makedirs(folder)
    os.chmod(folder, 0o755)  # nginx workers run as nobody
    try:
        return e.started(lambda: NpmProxy(folder, service, app))
    except BaseException:
        service.stop()
        raise


@pytest.fixture(scope="module")
def npm(tmp, upstream):  # noqa: F811 - the fixtures imported above
    running = start_npm(tmp, upstream, "npm")
    yield running
    running.stop()
    running.single.stop()


@pytest.fixture(scope="module")
def guarded(tmp, hyper):  # noqa: F811 - the fixtures imported above
    """test_e2e's attacks on the two NPM hosts that follow the recipe, hypercorn behind them."""
    running = start_npm(tmp, hyper, "npm-hypercorn")
    try:
        routes = []
        for label, host in (("npm", APP), ("npm with cache assets and websockets", APP1)):
            cookie = e.signed_in_through(running, host, "/x").cookie("auth_token")
            routes.append((label, host, "/page", f"Cookie: {cookie}\r\n", "127.0.0.1"))
        yield running, routes
    finally:
        running.stop()
        running.single.stop()


FORGED = {"Remote-User": "admin", "Remote-Name": "Mallory", "Remote-Email": "mallory@example.net",
          "Remote-Groups": "admins"}


# --- The recipe's text, as NPM takes it -------------------------------------------------------


def test_the_npm_files_are_the_nginx_files_in_npms_layout():
    """npm-http_top.conf is forward-auth.conf with the address NPM reaches forward-auth at; the
    Advanced text carries the server snippet's locations and the app snippet's lines (its
    auth_request lines at server level, so that a location NPM adds is checked too), and its own
    location /, the only line NPM's rule takes for one."""
    top, http = shipped("npm-http_top.conf"), shipped("forward-auth.conf")

    def body(text):
        return text[text.index("upstream forward_auth {"):].replace("server forward-auth:3000;", "server ADDRESS;")

    assert body(top) == body(http.replace("server 127.0.0.1:3000;", "server ADDRESS;"))
    advanced = shipped("npm-advanced.conf")
    assert [m.group(0) for m in USE_DEFAULT_LOCATION.finditer(advanced)] == ["location / {"]
    server_level = advanced[:advanced.index("\nlocation ")]
    snippets = shipped("forward-auth-server.conf") + shipped("forward-auth-proxy.conf") + shipped("forward-auth-app.conf")
    for line in snippets.splitlines():
        code = line.strip()
        if not code or code.startswith(("#", "include ")):
            continue
        if code.startswith(("auth_request /", "auth_request_set ", "error_page ")):
            assert f"\n{code}\n" in server_level, code
        else:
            assert code in advanced, code


def test_npm_renders_its_own_location_only_for_the_text_the_recipe_warns_against(npm):
    for host, own in ((APP, 1), (APP1, 1), (APP2, 2)):
        text = npm.rendered[host]
        assert len(re.findall(r"^\s*location / \{", text, re.MULTILINE)) == 1, host
        assert ("include conf.d/include/proxy.conf;" in text.split("location / {")[-1]) is (own == 2), host
    assert "include conf.d/include/assets.conf;" in npm.rendered[APP1]
    assert "proxy_set_header Upgrade $http_upgrade;" in npm.rendered[APP1]
    assert "assets.conf" not in npm.rendered[APP] and "$http_upgrade" not in npm.rendered[APP]


# --- Through real nginx -----------------------------------------------------------------------


@pytest.mark.parametrize("host", [APP, APP1])
def test_a_person_signs_in_through_nginx_proxy_manager_in_chromium(npm, browser, host):  # noqa: F811
    context = browser.new_context()
    page = context.new_page()
    target = npm.url(host, "/some/path?x=1")
    page.goto(target)
    assert urllib.parse.urlsplit(page.url).netloc == f"{host}:{npm.port}" and "/login?next=" in page.url
    assert page.title().startswith("Sign in")
    page.fill("#otp", npm.single.code())
    page.click("button[type=submit]")
    page.wait_for_url(target)
    seen = json.loads(page.text_content("#seen"))
    assert seen["remote_user"] == ["alice"] and seen["path"] == "/some/path?x=1"
    assert "auth_token" not in (seen["cookie"] or "")
    page.goto(npm.url(host, "/logout"))
    page.goto(target)
    assert "/login?next=" in page.url
    context.close()


@pytest.mark.parametrize("host", [APP, APP1])
def test_the_app_behind_npm_gets_the_four_identity_headers_and_never_a_clients_own(npm, host):
    service = npm.single
    cookie = e.signed_in_through(npm, host, "/who").cookie("auth_token")
    e.assert_all_four_identity_headers(service, lambda: npm.request("GET", host, "/who",
                                                                     headers={**FORGED, "Cookie": cookie}))
    plain = npm.request("GET", host, "/who", headers={**FORGED, "Cookie": cookie})
    for field in ("remote_name", "remote_email", "remote_groups"):  # alice has none now: no header at all
        assert plain.seen[field] == [], (field, plain.seen[field])
    path = e.marker("npm-anonymous")
    anonymous = npm.request("GET", host, path, headers={**FORGED, "Accept": "text/html"})
    assert anonymous.status == 302 and "/login?next=" in anonymous.header("Location")
    assert not e.app_saw(path)
    assert npm.request("GET", host, path, headers={**FORGED, "Accept": "application/json"}).status == 401
    assert not e.app_saw(path)


def test_the_app_behind_npm_gets_its_own_cookies_and_none_of_forward_auths(npm):
    login = e.signed_in_through(npm, APP, "/cookies")
    session, device = login.cookie("auth_token"), login.cookie("auth_token_device")
    for sent, expected in ((f"app_session=1; {session}; {device}; auth_token_csrf=abc; theme=dark",
                            "app_session=1; theme=dark"),
                           (f"{session}; auth_token_admin=x; auth_token_invite=y", None)):
        page = npm.request("GET", APP, "/cookies", headers={"Cookie": sent})
        assert page.status == 200 and page.seen["remote_user"] == ["alice"], sent
        assert (page.seen["cookie"] or None) == expected, (sent, page.seen["cookie"])


def test_an_app_token_opens_an_npm_host_and_a_wrong_one_does_not(npm):
    token = e.app_token(npm.single, "npm-script")
    r = npm.request("GET", APP, "/api/items", headers={"Authorization": f"Bearer {token}", "Accept": "*/*"})
    assert r.status == 200 and r.seen["remote_user"] == ["alice"]
    r = npm.request("GET", APP, "/api/items", headers={"Authorization": "Bearer fat_wrong", "Accept": "text/html"})
    assert r.status == 401 and r.header("Location") is None and e.reached_app(r) is None


def test_with_cache_assets_on_an_asset_is_still_checked_but_its_headers_are_npms(npm):
    """Cache Assets adds a regex location before the Advanced text; the recipe's server-level
    auth_request still checks it. Its own proxy_set_header lines (proxy.conf) are why the recipe says
    to leave Cache Assets off: there a client's own Remote-User and forward-auth's cookies reach the
    app (shown below, so that a change in NPM or nginx is noticed)."""
    path = e.marker("asset") + ".png"
    for accept, status in (("text/html", 302), ("image/avif,image/webp,*/*", 401)):
        r = npm.request("GET", APP1, path, headers={**FORGED, "Accept": accept})
        assert r.status == status and e.reached_app(r) is None, (accept, r.status)
    assert not e.app_saw(path)
    cookie = e.signed_in_through(npm, APP1, "/assets").cookie("auth_token")
    cached = npm.request("GET", APP1, path, headers={"Cookie": cookie, **FORGED})
    assert cached.status == 200 and cached.seen["path"] == path
    assert cached.seen["remote_user"] == ["admin"] and cookie in cached.seen["cookie"]  # the warned-of hazard
    recipe = npm.request("GET", APP, path, headers={"Cookie": e.signed_in_through(npm, APP, "/a").cookie("auth_token"),
                                                     **FORGED})
    assert recipe.status == 200 and recipe.seen["remote_user"] == ["alice"]  # Cache Assets off: our location


def test_without_its_own_location_the_advanced_text_lets_a_forged_remote_user_through(npm):
    """What the recipe warns against, proven: the header lines at server level are dropped in NPM's
    own location / (proxy.conf has proxy_set_header lines, so nginx passes it none of the
    server's). The check still runs; the identity the app gets is the client's."""
    cookie = e.signed_in_through(npm, APP2, "/warned").cookie("auth_token")
    page = npm.request("GET", APP2, "/warned", headers={"Cookie": cookie, **FORGED})
    assert page.status == 200 and page.seen["remote_user"] == ["admin"] and page.seen["remote_groups"] == ["admins"]
    assert npm.request("GET", APP2, "/warned", headers={**FORGED, "Accept": "text/html"}).status == 302


def test_lets_encrypts_challenge_stays_open_and_nothing_else_does(npm):
    """NPM serves the HTTP challenge from a location of its own (with auth_basic off, not
    auth_request): the recipe lets exactly a token path through, so certificates still renew."""
    for host in (APP, APP1):
        r = e.raw_request(npm.port, host, f"/.well-known/acme-challenge/{ACME_TOKEN}")
        assert r.status == 200 and r.body == b"the challenge's answer", (host, r.status)
    for target in (f"/.well-known/acme-challenge/{ACME_TOKEN}/../../../private", "/.well-known/acme-challenge/../x",
                   "/.well-known/acme-challenge/%2e%2e/x", f"/.well-known/acme-challenge/{ACME_TOKEN}?next=/x",
                   "/.well-known/acme-challenge/", "/.well-known/acme-challenge/a/b", "/.well-known/acme-challenge",
                   "/.well-known/acme-challenge/..%2f..%2fx"):
        r = e.raw_request(npm.port, APP, target)
        assert r.status in (302, 400, 404) and e.reached_app(r) is None, (target, r.status)


def test_no_h2c_upgrade_reaches_the_app_in_a_location_npm_adds(tmp, hyper):  # noqa: F811
    """With Websockets Support on (Upgrade and Connection at server level) and Cache Assets on, an
    h2c upgrade on an asset path (NPM's location, not the recipe's) never reaches the app upgraded."""
    running = start_npm(tmp, hyper, "npm-h2c")
    try:
        cookie = e.signed_in_through(running, APP1, "/x").cookie("auth_token")
        for upgrade in (("Upgrade: h2c",), ("Upgrade: websocket, h2c",), ("Upgrade: websocket",)):
            since = len(hyper.seen)
            first, second = e.marker("h2c-a") + ".png", e.marker("h2c-b") + ".png"
            status, streams, _ = e.h2c_attempt(running.port, APP1, first, second, f"Cookie: {cookie}\r\n", upgrade)
            assert status != 101 and not streams, (upgrade, status, streams)
            assert not hyper.unchecked(since, paths=[second]), hyper.seen[since:]
            assert all(seen["type"] == "http" and seen["http_version"] != "2" for seen in hyper.seen[since:])
    finally:
        running.stop()
        running.single.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
