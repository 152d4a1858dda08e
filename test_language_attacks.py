"""Red team, "pages in the visitor's language" (4.0): attacks on the lang query and cookie,
Accept-Language, the picker's links, error pages, the admin page's messages, the catalogues,
"Not NAME?" and the note after a reset. In-process WSGI (and real waitress on 127.0.0.1, port 0),
FakeClock, no sleeps.

A subagent given README and SPEC wrote these. HOLE: the attack worked when written (5 holes, all
fixed: a catalogue file that stopped the start, catalogue texts with a format spec, conversion or
braces that made pages 500 or 20 MB, a plural rule that failed above n=999, and the note after a
reset shown to the lost phone itself, now on the new invitation link instead); DECIDED: the attack
worked and stays, by SPEC, with the README saying so; HELD: the defence held."""

import json
import logging
import os
import random
import re
import sqlite3
import time
import urllib.parse

import pytest

import forward_auth as fa
from conftest import Server, code_at
from test_forward_auth import (
    ADMIN,
    FORM,
    add_user,
    admin_get,
    admin_post,
    call,
    check,
    csrf_for,
    device_of,
    invite,
    login,
    make_admin,
    session_cookie,
    settings,
    signed_in_as,
)

HERE = os.path.dirname(os.path.abspath(fa.__file__))
SHIPPED = fa.Languages.load()
TAGS = [catalogue.tag for catalogue in SHIPPED]
HTML_PAGE = {"Accept": "text/html"}
XSS = '<script>alert(1)</script>"\'><img src=x onerror=alert(2)>'


def write_catalogue(folder, tag, texts, **meta):
    data = {"language": meta.pop("language", tag), "plural_forms": "nplurals=2; plural=(n != 1);", **meta,
            "texts": texts}
    (folder / f"{tag}.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def html_lang(response):
    match = re.search(r'<html lang="([^"]*)"', response.text)
    return match and match.group(1)


def cookie_attributes(line):
    """{attribute (lowercase): value} of a Set-Cookie line, and the name=value first."""
    first, *rest = line.split(";")
    return first.strip(), {k.strip().lower(): v.strip() for k, _, v in (part.partition("=") for part in rest)}


# =============================================================================
# HOLES
# =============================================================================


def test_decided_the_lang_cookie_is_the_login_hosts_own_which_per_app_logins_share_with_the_app(store, clock):
    """DECIDED: with the default relative LOGIN_URL (/login on each app's own host) the picker's
    `lang` cookie (SPEC: `Path=/`) is the app host's own, so that app receives it, and an app that
    keeps a `lang` cookie of its own (Gitea) shares it. Not stripped by the shipped configs: that
    would also strip the app's own `lang`. It holds only a shipped tag; behind a shared login host
    (the README's way for a household) it stays on the login host. The README says all this."""
    app = fa.make_app(settings(), store=store, clock=clock)
    answer = call(app, "GET", "/login", query="lang=de", headers={"Host": "jellyfin.example.com"})
    first, attributes = cookie_attributes(answer.cookies()["lang"])
    assert first == "lang=de" and "domain" not in attributes and attributes["path"] == "/"
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as file:
        readme = " ".join(file.read().split())
    assert "with the login page on an app's own host, that app gets it too" in readme


@pytest.mark.parametrize("name, content", [
    ("plural_forms a number", json.dumps({"language": "X", "plural_forms": 2, "texts": {}})),
    ("plural_forms true", json.dumps({"language": "X", "plural_forms": True, "texts": {}})),
    ("a plural rule dividing by zero", json.dumps({"language": "X", "plural_forms": "nplurals=2; plural=n/0;",
                                                    "texts": {}})),
    ("a plural rule n % 0", json.dumps({"language": "X", "plural_forms": "nplurals=2; plural=(n%0);", "texts": {}})),
    ("JSON nested 100000 deep", "[" * 100000),
    ("a text nested 100000 deep", '{"language": "X", "texts": {"sign_in": ' + "[" * 100000 + "]" * 100000 + "}}"),
], ids=["plural-int", "plural-bool", "plural-div0", "plural-mod0", "deep-json", "deep-text"])
def test_hole_one_bad_catalogue_file_stops_the_server_from_starting(tmp_path, store, clock, caplog, name, content):
    """HOLE: a file in languages/ that is not a usable catalogue is supposed to be "one log line"
    (Languages.load's docstring; the README: restart, a bad text "shows in English and is named in
    the log"). Languages.load catches only OSError, ValueError and UnicodeDecodeError, so a
    `plural_forms` that is not a string (TypeError in re.fullmatch), a plural rule that divides by
    zero for some n below 1000 (ZeroDivisionError in plural_rule's range check) or JSON nested
    deeper than the recursion limit (RecursionError in json.load) escapes from Languages.load() and
    App.__init__: `python forward_auth.py` dies at start with a traceback, every language and the
    whole login with it, for one translator's typo.

    Request: none; a file languages/xx.json with e.g. {"plural_forms": 2} or "nplurals=2; plural=n/0;".
    Answer: TypeError / ZeroDivisionError / RecursionError out of make_app()."""
    write_catalogue(tmp_path, "de", {"sign_in": "Anmelden"})
    (tmp_path / "xx.json").write_text(content, encoding="utf-8")
    with caplog.at_level(logging.WARNING, "forward_auth"):
        try:
            languages = fa.Languages.load(str(tmp_path))
        except Exception as error:  # noqa: BLE001 - what a start would die of
            pytest.fail(f"{name}: the server would not start: {type(error).__name__}: {str(error)[:100]}")
    assert [catalogue.tag for catalogue in languages] == ["en", "de"]
    assert any("xx.json not used" in record.getMessage() for record in caplog.records)
    app = fa.make_app(settings(), store=store, clock=clock, languages=languages)
    assert call(app, "GET", "/login", headers={"Accept-Language": "de"}).status == 200


def _device_bound_login_page(app, store, clock, language):
    seed = add_user(store, "oma")
    app.refresh(clock(), force=True)
    device = device_of(app, login(app, code_at(seed, clock())))
    return call(app, "GET", "/login", headers={"Cookie": device, "Accept-Language": language})


def _invitation_page(app, store, clock, language, ttl=3 * 86400):
    token, _ = invite(store, "carol", now=clock(), ttl=ttl)
    return call(app, "GET", "/login", query="invite=" + token, headers={"Accept-Language": language})


@pytest.mark.parametrize("name, texts, page", [
    ("a format spec the value's type refuses", {"signing_in_as": "Anmelden als {name:d}"},
     _device_bound_login_page),
    ("a conversion and spec on the Not NAME? link", {"not_name": "Nicht {name!r:d}?"}, _device_bound_login_page),
    ("a placeholder in the weekday names", {"weekdays": "{x} Di Mi Do Fr Sa So"}, _invitation_page),
    ("a lone brace in the month names", {"months": "Jan Feb Mar Apr Mai Jun Jul Aug Sep Okt Nov Dez{"},
     _invitation_page),
], ids=["spec", "conversion", "weekdays", "months"])
def test_hole_a_catalogue_text_the_loader_accepts_makes_a_page_500(tmp_path, store, clock, name, texts, page):
    """HOLE: the loader keeps a translation whose placeholder *names* match English's
    (usable_translation compares only names; weekdays/months only their word count), so a text
    with a format spec or conversion ({name:d}), or braces in the weekday or month names, is
    loaded, and str.format raises when a page uses it: every visitor in that language gets 500
    "Something went wrong" on that page (the device-bound login page: nobody with that browser can
    sign in; the invitation page: nobody invited can enrol). SPEC: "No input ever yields a 500";
    the README: a text with other placeholders "shows in English and is named in the log".

    Request: GET /login (a device cookie), Accept-Language: de, with languages/de.json holding
    "signing_in_as": "Anmelden als {name:d}"; or GET /login?invite=... with "weekdays": "{x} Di ...".
    Answer: 500."""
    write_catalogue(tmp_path, "de", {"sign_in": "Anmelden", **texts})
    app = fa.make_app(settings(), store=store, clock=clock, languages=fa.Languages.load(str(tmp_path)))
    answer = page(app, store, clock, "de")
    assert answer.status == 200, f"{name}: {answer.status} {answer.text[-300:]}"


def test_hole_a_catalogue_width_spec_makes_each_page_tens_of_megabytes(tmp_path, store, clock):
    """HOLE: a format spec passes the loader's check, so a counted phrase "{n:>20000000} Tage" (a
    typo'd or hostile pull request; README invites changes to "that one file") makes every
    invitation page a 20 MB answer built in memory per request: a memory and bandwidth DoS that
    any anonymous request for the page (a chat app's link preview) triggers.

    Request: GET /login?invite=TOKEN, Accept-Language: de, with "in_days": ["{n:>20000000} Tag", ...].
    Answer: 200 with a body of more than 20,000,000 bytes."""
    write_catalogue(tmp_path, "de", {"in_days": ["{n:>20000000} Tag", "{n:>20000000} Tage"]})
    app = fa.make_app(settings(), store=store, clock=clock, languages=fa.Languages.load(str(tmp_path)))
    answer = _invitation_page(app, store, clock, "de")
    assert answer.status == 200 and len(answer.body) < 1_000_000, f"{len(answer.body)} bytes"


def test_hole_a_plural_rule_checked_below_1000_only_fails_a_page_above_it(tmp_path, store, clock):
    """HOLE: plural_rule() proves a rule in range for n < 1000 only, and Catalogue.count() calls it
    unguarded for any n: a rule that raises for n = 1000 (here n/(n-1000)) loads, and the admin's
    history page (HISTORY_DAYS=1000, "Kept 1000 days") answers 500 in that language; the login
    page's "Try again in N minutes" does the same for the minute a 24 h lockout passes 1000.

    Request: GET /login/admin/history (an admin, fresh), Accept-Language: de, HISTORY_DAYS=1000.
    Answer: 500."""
    write_catalogue(tmp_path, "de", {"history_kept": ["{n} Tag.", "{n} Tage."]},
                    plural_forms="nplurals=2; plural=n/(n-1000) ? 1 : 0;")
    languages = fa.Languages.load(str(tmp_path))
    assert languages.shipped("de") is not None  # the loader took it
    app = fa.make_app(settings(history_days=1000), store=store, clock=clock, languages=languages)
    seed = make_admin(store)
    cookie = signed_in_as(app, seed, clock)
    answer = admin_get(app, cookie, ADMIN + "/history", headers={"Accept-Language": "de"})
    assert answer.status == 200, answer.text[-300:]


def test_hole_the_lost_phone_itself_is_told_of_the_reset_and_pointed_at_the_new_link(app, store, clock):
    """HOLE: the note after a reset went to every browser holding the person's device cookie, on the
    reasoning "only a browser that signed in as them holds it". A reset is for a *lost phone*: the
    browser on that phone holds the device cookie (400 days; a reset does not end it), and whoever
    found it is the one stranger the reset is meant for. The login page there told them the account
    was just reset and to "Open the new invitation link oma was sent" (on a grandparent's only
    phone, where the message with the link most likely arrives). Now the note is on the new
    invitation link's pages, to whoever holds that link, and the lost phone hears nothing new.

    Request: GET /login, Cookie: auth_token_device=<the lost phone's device cookie>, after the
    admin's "Lost phone" reset of oma."""
    oma = add_user(store, "oma")
    app.refresh(clock(), force=True)
    lost_phone = device_of(app, login(app, code_at(oma, clock())))
    clock.advance(3600)
    link = app.household.invite("oma", fa.COMMAND_LINE, reset_only=True)  # the admin: oma lost her phone
    app.refresh(clock(), force=True)
    note = fa.escape(SHIPPED.english.say("replaces_old_entry", app_name=app.settings.app_name))
    finder = call(app, "GET", "/login", headers={"Cookie": lost_phone})
    assert finder.status == 200 and note not in finder.text and "invitation" not in finder.text
    tried = login(app, code_at(oma, clock()), extra_cookie=lost_phone)  # the old entry's code
    assert "Wrong code for oma." in tried.text and note not in tried.text and "invitation" not in tried.text
    assert note in call(app, "GET", "/login", query="invite=" + link.token).text  # said to the new link's holder


# =============================================================================
# HELD
# =============================================================================


# --- The lang value: XSS, header injection, cookie tossing ------------------------------------


@pytest.mark.parametrize("value", [
    "de\r\nSet-Cookie: evil=1", "de; Domain=.example.com", "de%0d%0aX: y", "de\x00", "ja\u2028",
    '"><svg onload=alert(1)>', "de,fr", "d\u0130", "\u212a", "de\t", "DE-de",
])
def test_held_a_hostile_lang_never_reaches_a_header_or_the_page(app, value):
    """HELD: ?lang= and the lang cookie are matched against the shipped tags (lowercased) and only
    the file's own tag is ever written (Set-Cookie, Content-Language, <html lang>): CR/LF, Domain
    attributes, NUL, Unicode case tricks (Kelvin sign, dotted I) and markup go nowhere."""
    quoted = urllib.parse.quote(value, safe="")
    for response in (call(app, "GET", "/login", query="lang=" + quoted),
                     call(app, "GET", "/login", headers={"Cookie": "lang=" + quoted.replace("%3B", ";")}),
                     call(app, "GET", "/nowhere", query="lang=" + quoted, headers=HTML_PAGE)):
        assert response.status in (200, 404)
        assert html_lang(response) in TAGS and response.header("Content-Language") in TAGS
        assert "evil" not in str(response.header_list) and "onload" not in response.text
        assert set(response.cookies()) <= {"auth_token_csrf"}


def test_held_header_injection_through_the_picker_on_real_waitress(app):
    """HELD: through real waitress, ?lang=de%0d%0aSet-Cookie:%20evil=1 answers with no evil
    cookie and no lang cookie; ?lang=de answers `lang=de` and nothing else of it."""
    server = Server(app)
    try:
        bad = server.request("GET", "/login?lang=de%0d%0aSet-Cookie:%20evil=1", headers=HTML_PAGE)
        assert bad.status == 200 and "evil" not in str(bad.header_list) and "lang" not in bad.cookies()
        good = server.request("GET", "/login?lang=de", headers=HTML_PAGE)
        first, attributes = cookie_attributes(good.cookies()["lang"])
        assert first == "lang=de" and "domain" not in attributes and good.header("Content-Language") == "de"
    finally:
        server.stop()


def test_held_a_tossed_lang_cookie_only_ever_picks_a_shipped_language(app):
    """HELD (with a note): a sibling subdomain can plant `lang=ja; Domain=.example.com; Path=/login`,
    which the browser sends before the visitor's own pick, and the page is then in Japanese: the
    value is only ever matched against the shipped list, so the most a tosser gets is another of
    the shipped languages (a nuisance; the picker still switches back). Markup, many values and
    junk are skipped."""
    tossed = call(app, "GET", "/login", headers={"Cookie": "lang=ja; lang=de"})
    assert html_lang(tossed) == "ja"
    junk = "; ".join([f"lang={XSS.replace(';', '')}"] * 50 + ["lang=sv"])
    page = call(app, "GET", "/login", headers={"Cookie": junk})
    assert html_lang(page) == "sv" and "<script>alert" not in page.text and "onerror" not in page.text


def test_held_on_a_shared_login_host_the_lang_cookie_stays_on_the_login_host(store, clock):
    """HELD: with LOGIN_URL on a login host and COOKIE_DOMAIN=.example.com, the pick is host-only
    on the login host (no Domain), and an app host's own /login?lang=de is sent on to the login
    host without setting any lang cookie on the app's host."""
    app = fa.make_app(settings(login_url="https://auth.example.com/login", cookie_domain=".example.com"),
                      store=store, clock=clock)
    there = call(app, "GET", "/login", query="lang=de", headers={"Host": "auth.example.com"})
    assert "domain" not in cookie_attributes(there.cookies()["lang"])[1]
    app_host = call(app, "GET", "/login", query="lang=de&next=%2Fx", headers={"Host": "jellyfin.example.com"})
    assert app_host.status == 302 and "lang" not in app_host.cookies()
    assert app_host.header("Location").startswith("https://auth.example.com/login?")


# --- The picker's links: next, invite, open redirect ------------------------------------------


@pytest.mark.parametrize("next_value", [
    "https://evil.com/", "//evil.com/", "javascript:alert(1)", '/"><script>alert(1)</script>',
    "https://app1.example.com@evil.com/", "/\\evil.com", "/ok\r\nSet-Cookie: x=1",
])
def test_held_the_picker_carries_only_a_judged_next(app, next_value):
    """HELD: every picker link is a relative `?query` whose next is the one safe_next() already
    judged: a refused next is not carried at all, markup is percent-encoded and then escaped, and
    following a link (GET /login?next=...&lang=..) never leaves for a foreign host."""
    page = call(app, "GET", "/login", query=urllib.parse.urlencode({"next": next_value}))
    picker = re.search(r'<nav class="langs"[^>]*>(.*?)</nav>', page.text).group(1)
    hrefs = re.findall(r'href="([^"]*)"', picker)
    assert hrefs and all(href.startswith("?") for href in hrefs)
    judged = app.signin.safe_next(fa.Request({"HTTP_HOST": "auth.example.com", "REMOTE_ADDR": "127.0.0.1",
                                              "wsgi.url_scheme": "http"}, app.trust, 0), next_value)
    for href in hrefs:
        query = urllib.parse.parse_qs(href.replace("&amp;", "&")[1:])
        assert set(query) <= {"next", "lang"} and query.get("next", ["/"])[0] == judged
        assert '"' not in href and "<" not in href and "\r" not in href
    assert "<script>" not in page.text and "evil" not in picker


def test_held_a_signed_in_pick_with_a_foreign_next_is_still_judged(app, store, clock):
    """HELD: GET /login?next=//evil.com/&lang=de while signed in answers 302 to a judged place
    (not evil.com), with the lang cookie."""
    seed = add_user(store, "alice")
    app.refresh(clock(), force=True)
    cookie = session_cookie(app, login(app, code_at(seed, clock())))
    answer = call(app, "GET", "/login", query="next=%2F%2Fevil.com%2F&lang=de", headers={"Cookie": cookie})
    assert answer.status == 302 and "evil" not in answer.header("Location")
    assert answer.cookie_value("lang") == "de"


def test_held_the_invitation_pickers_links_carry_only_the_links_own_token_and_open_nothing(app, store, clock):
    """HELD: the invitation page's picker repeats the page's own (already validated) token in
    relative links; following one is a GET that binds no browser and shows no seed; a dead or
    malformed token gets the 410 page, with no picker, no token and no lang cookie."""
    token, seed = invite(store, "carol", now=clock())
    page = call(app, "GET", "/login", query="invite=" + token)
    links = re.findall(r'<a href="(\?[^"]*)" lang=', page.text)
    assert links and all(link.startswith(f"?invite={token}&amp;lang=") for link in links)
    followed = call(app, "GET", "/login", query=f"invite={token}&lang=de")
    assert followed.status == 200 and html_lang(followed) == "de" and seed not in followed.text
    assert store.invite(fa.digest(token), clock()).browser is None  # nothing bound by a GET
    gone = call(app, "GET", "/login", query="invite=" + "x" * 43 + "&lang=de")
    assert gone.status == 410 and "x" * 43 not in gone.text and '<nav class="langs"' not in gone.text
    assert "lang" not in gone.cookies()
    odd = call(app, "GET", "/login", query="invite=" + urllib.parse.quote(XSS) + "&lang=de")
    assert odd.status == 410 and "<script>alert" not in odd.text


# --- The check path --------------------------------------------------------------------------


def test_held_the_check_path_touches_no_database_whatever_language_it_is_asked_in(app, store, clock, monkeypatch):
    """HELD: /verify and /auth with a lang cookie, ?lang=, Accept-Language and Accept: text/html read
    nothing from the database for allow, redirect, forbidden (the refused-host page, which is in
    the visitor's language) and a bad forwarded URL (an error page): the reset check is the login
    page's only."""
    alice = add_user(store, "alice")
    store.set_hosts("alice", ("app1.example.com",))
    app.refresh(clock(), force=True)
    cookie = session_cookie(app, login(app, code_at(alice, clock())))
    device = device_of(app, login(app, code_at(alice, clock() + 30)))

    def refuse(*args, **kwargs):
        raise AssertionError("the database was read on the check path")

    for method in ("user", "users", "invites", "active_users", "live_sessions", "history"):
        monkeypatch.setattr(store, method, refuse)
    headers = {**HTML_PAGE, "Accept-Language": "ja"}

    def asked(cookie, url="https://app1.example.com/?lang=fr", path="/verify"):
        return call(app, "GET", path, query="lang=fr", headers={**headers, "X-Original-URL": url, "Cookie": cookie})

    for path in ("/verify", "/auth"):
        extra = f"; lang=de; {device}"
        allowed = asked(cookie + extra, path=path)
        assert allowed.status == 200
        refused = asked(cookie + extra, url="https://app2.example.com/?lang=fr", path=path)
        assert refused.status == 403
        anonymous = asked("lang=de; " + device, path=path)
        assert anonymous.status in (302, 401)
        bad = asked("lang=de", url="javascript:alert(1)//", path=path)
        assert bad.status in (400, 401)
    forbidden = check(app, cookie + "; lang=de", url="https://app2.example.com/", headers=headers)
    assert html_lang(forbidden) == "de" and forbidden.header("Cache-Control") == "no-store"


def test_held_auth_never_answers_400_even_to_a_browser_asking_for_html(app):
    """HELD: nginx's /auth with Accept: text/html and an unusable forwarded URL still gets 401 with
    a login Location (never the new 400 error page, which nginx would turn into a 500)."""
    for url in ("javascript:alert(1)//", "https://a@b.example.com/", "https://x.example.com,evil/"):
        answer = check(app, None, url=url, path="/auth", headers={**HTML_PAGE, "Accept-Language": "de"})
        assert answer.status == 401 and answer.header("Location")


def test_held_a_huge_accept_language_costs_little_and_answers(app):
    """HELD (with a note): MAX_LANGUAGE_RANGES bounds the ranges judged, not the parameters of one
    range (`de;;;;...` or `de;q=1;q=1...` are walked in Python), but waitress refuses headers over
    32 KiB (431), so the worst a request can cost is a few milliseconds: measured 4.3 ms against
    1.1 ms for 30 KB of junk in another header."""
    worst = [";" * 32000, "de" + ";q=1" * 8000, ",".join(["de-at-x"] * 4000), "a-" * 16000]
    for header in worst:
        started = time.perf_counter()
        SHIPPED.negotiate(header)
        assert time.perf_counter() - started < 0.5
    server = Server(app)
    try:
        for header in worst:
            answer = server.request("GET", "/login", headers={"Accept-Language": header[:30000]})
            assert answer.status == 200
        assert server.request("GET", "/login", headers={"Accept-Language": ";" * 40000}).status == 431
    finally:
        server.stop()


def test_held_random_accept_language_values_never_raise():
    """HELD: 50,000 random Accept-Language values over a hostile alphabet (q values, NBSP, the
    Kelvin sign, NUL, separators) are negotiated without an exception, always to a shipped tag."""
    alphabet = list("abdejpDE-_*;,=q .0123456789\t\x00\xa0\x1c\u00df\u0130\u212a")
    rng = random.Random(27)
    for _ in range(50000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert SHIPPED.negotiate(value).tag in TAGS


# --- Queries that cannot be parsed, error pages ---------------------------------------------


@pytest.mark.parametrize("query", [
    "lang=%ff", "lang=%", "lang", "lang=de&lang=%00", "&" * 40 + "lang=de",
    "&".join(f"f{i}=1" for i in range(fa.MAX_QUERY_FIELDS + 5)) + "&lang=de",
    "next=%ZZ&lang=de", "invite&lang=de", "lang=" + "x" * 9000,
])
@pytest.mark.parametrize("path", ["/login", "/nowhere", ADMIN, "/logout"])
def test_held_a_query_that_cannot_be_parsed_is_never_a_500(app, path, query):
    """HELD: a query over MAX_QUERY_FIELDS, bad percent-encoding, a bare `lang`, NUL: a page, a
    400/404 error page in a shipped language, or a redirect; never a 500."""
    answer = call(app, "GET", path, query=query, headers={**HTML_PAGE, "Accept-Language": "de"})
    assert answer.status in (200, 302, 400, 404, 410), (answer.status, answer.text[:200])
    if answer.header("Content-Type") and "html" in answer.header("Content-Type"):
        assert html_lang(answer) in TAGS


def test_held_error_pages_keep_the_plain_answers_status_and_headers_and_echo_nothing(app):
    """HELD: a browser's error page has the plain answer's status, Allow and Retry-After, every
    security header (CSP, nosniff, no-store, DENY), Vary: Accept-Language, Cookie, and no part of
    the request (path, query) in it."""
    for method, path, query in (("GET", "/<script>x", "a=<img src=x onerror=1>"), ("PUT", "/login", "x=<b>"),
                                ("DELETE", "/logout", "<svg>"), ("GET", "/metrics/<svg>", "")):
        plain = call(app, method, path, query=query)
        page = call(app, method, path, query=query, headers={**HTML_PAGE, "Accept-Language": "fr"})
        assert page.status == plain.status and page.header("Allow") == plain.header("Allow")
        assert page.header("Content-Type") == "text/html; charset=utf-8" and html_lang(page) == "fr"
        for name in ("Content-Security-Policy", "X-Content-Type-Options", "Cache-Control", "X-Frame-Options"):
            assert page.header(name) == plain.header(name) and page.header(name)
        assert page.header("Cache-Control") == "no-store" and "Accept-Language" in page.header("Vary")
        for part in ("<script", "<img", "onerror", "<svg", "<b>"):
            assert part not in page.text


def test_held_a_database_error_and_an_internal_error_are_pages_without_detail(app, store, clock, monkeypatch):
    """HELD: a page's database read failing (the invitation page's) is a 503 page with Retry-After,
    and an unexpected exception is a 500 page, both in the visitor's language and without the
    exception's text."""

    def busy(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked /srv/zqdetail/auth.db")

    monkeypatch.setattr(store, "invite", busy)
    answer = call(app, "GET", "/login", query="invite=" + "x" * 43, headers={**HTML_PAGE, "Accept-Language": "it"})
    assert answer.status == 503 and answer.header("Retry-After") == "5" and html_lang(answer) == "it"
    assert "zqdetail" not in answer.text and "locked" not in answer.text
    monkeypatch.undo()

    def broken(*args, **kwargs):
        raise RuntimeError("Traceback /srv/zqdetail detail")

    monkeypatch.setattr(fa.SignIn, "form", broken)
    answer = call(app, "GET", "/login", headers={**HTML_PAGE, "Accept-Language": "sv"})
    assert answer.status == 500 and html_lang(answer) == "sv" and "zqdetail" not in answer.text


# --- "Not NAME?" ----------------------------------------------------------------------------


def test_held_not_name_needs_the_csrf_token_and_the_same_site(app, store, clock):
    """HELD: the link-styled "Not NAME?" is still a POST behind the login form's guard: without the
    token 403 and the device kept, cross-site 403 and the device kept; with it, the device cookie
    is expired and the browser goes back to the login page."""
    seed = add_user(store, "oma")
    app.refresh(clock(), force=True)
    device = device_of(app, login(app, code_at(seed, clock())))
    page = call(app, "GET", "/login", headers={"Cookie": device})
    csrf_cookie, token = csrf_for(app, page)
    cookie = f"{device}; {csrf_cookie}"
    for headers, body in (({**FORM, "Cookie": cookie}, "action=forget"),
                          ({**FORM, "Cookie": cookie}, "action=forget&csrf=" + "A" * 43),
                          ({**FORM, "Cookie": cookie, "Sec-Fetch-Site": "cross-site"}, f"action=forget&csrf={token}"),
                          ({**FORM, "Cookie": cookie, "Origin": "https://evil.com"}, f"action=forget&csrf={token}")):
        answer = call(app, "POST", "/login", headers=headers, body=body.encode())
        assert answer.status == 403 and app.cookies.device_name not in answer.cookies()
    done = call(app, "POST", "/login", headers={**FORM, "Cookie": cookie}, body=f"action=forget&csrf={token}".encode())
    assert done.status == 302 and "Max-Age=0" in done.cookies()[app.cookies.device_name]


# --- The note after a reset: nobody else gets it ----------------------------------------------


def test_held_the_reset_note_needs_that_persons_own_valid_device_cookie(app, store, clock):
    """HELD: no device cookie, a session token or the admin page's cookie in the device cookie's
    place, a device cookie with its user changed, a device cookie of a user deleted and invited
    again under the same name, and device cookies of two people at once: none of them is told
    that anyone was reset, nor any name, so the note enumerates nobody."""
    oma, bob = make_admin(store, "oma"), add_user(store, "bob")
    eve = add_user(store, "eve")
    app.refresh(clock(), force=True)
    oma_in = login(app, code_at(oma, clock()))
    bob_device = device_of(app, login(app, code_at(bob, clock())))
    eve_device = device_of(app, login(app, code_at(eve, clock())))
    clock.advance(60)
    app.household.invite("oma", fa.COMMAND_LINE, reset_only=True)
    app.household.delete("eve", fa.COMMAND_LINE)
    clock.advance(2)
    app.household.invite("eve", fa.COMMAND_LINE, new_only=True)  # a new eve, pending
    app.refresh(clock(), force=True)
    device = app.cookies.device_name
    session_token = oma_in.cookie_value(app.settings.cookie_name)
    admin_token = oma_in.cookie_value(app.cookies.admin_name)
    real = oma_in.cookie_value(device)
    head, payload, signature = real.split(".")
    claims = json.loads(fa._b64decode(payload))
    forged = ".".join([head, fa._b64encode(json.dumps({**claims, "sub": "bob"}).encode()), signature])
    real_page = call(app, "GET", "/login", headers={"Cookie": f"{device}={real}"}).text
    assert "replace" not in real_page and "invitation" not in real_page  # not even oma's own (lost) browser
    for cookie in ("", f"{device}={session_token}", f"{device}={admin_token}", f"{device}={forged}",
                   eve_device, f"{device}={real}; {bob_device}"):
        page = call(app, "GET", "/login", headers={"Cookie": cookie} if cookie else None)
        failed = login(app, "123456", extra_cookie=cookie)
        for response in (page, failed):
            assert "replace" not in response.text and "invitation" not in response.text
            assert "oma" not in response.text and "eve" not in response.text


# --- The admin page's messages, the history, names -------------------------------------------


@pytest.mark.parametrize("language", ["en", "de", "ja"])
def test_held_the_admin_pages_messages_escape_the_values_they_now_carry(store, clock, language):
    """HELD: the admin page's refusals now name the value (a bad host pattern, email, user, group
    or label); each is escaped, braces in it are never a template ({t[sign_in]}, {0}, a lone {),
    and the answer is a 400/409 page in the visitor's language, never a 500."""
    app = fa.make_app(settings(), store=store, clock=clock)
    seed = make_admin(store)
    add_user(store, "bob")
    cookie = signed_in_as(app, seed, clock)
    hostile = XSS + " {t[sign_in]} {0} {value} {"
    lang = {"Accept-Language": language}
    for fields, query, path in (
        ({"action": "hosts", "hosts": hostile}, "name=bob", ADMIN + "/user"),
        ({"action": "identity", "email": '"><svg onload=alert(1)>@x{0}', "full_name": "", "groups": ""},
         "name=bob", ADMIN + "/user"),
        ({"action": "identity", "groups": "family,<zb>{name}</zb>", "full_name": "", "email": ""}, "name=bob",
         ADMIN + "/user"),
        ({"action": "token", "label": "<zi>{label}</zi>"}, "name=bob", ADMIN + "/user"),
        ({"action": "invite", "user": "<script>{0}"}, "", ADMIN),
        ({"action": "invite", "user": "carol", "hosts": "{t[x]} <zb>"}, "", ADMIN),
        ({"action": "delete", "confirm": "{name}<zb>"}, "name=bob", ADMIN + "/user"),
    ):
        answer = admin_post(app, cookie, fields, path, query, headers=lang)
        assert answer.status in (400, 409), (fields, answer.status, answer.text[-300:])
        assert html_lang(answer) == language
        for part in ("<script>alert", "<img src", "<svg", "<zb>", "<zi>"):
            assert part not in answer.text
        assert 'role="alert"' in answer.text


def test_held_stored_history_values_are_escaped_and_never_templates(app, store, clock):
    """HELD: a history line with an unknown event name, a user agent, an address and a detail full of
    markup and braces (what a hand-edited or future database may hold; a stranger's user agent on
    a failed sign-in) shows escaped and literally on the history page in every language."""
    seed = make_admin(store)
    cookie = signed_in_as(app, seed, clock)
    store.record(fa.HistoryEntry(clock(), XSS + "{0}", "alice", "{t[sign_in]}<zb>", "<zi>1.2.3.4", XSS + "{",
                                 "known", "{value} <zu>x</zu>"))
    login(app, "000000", headers={"User-Agent": XSS + " {t[sign_out]} {"})  # a stranger's failed attempt
    for tag in TAGS:
        answer = admin_get(app, cookie, ADMIN + "/history", headers={"Accept-Language": tag})
        assert answer.status == 200 and html_lang(answer) == tag
        for part in ("<script>alert", "<img src", "<zb>", "<zi>1", "<zu>"):
            assert part not in answer.text
        assert "{t[sign_in]}" in answer.text and "{t[sign_out]}" in answer.text


def test_held_a_full_name_with_braces_is_never_formatted(app, store, clock):
    """HELD: a full name "{t[sign_out]} {app_name} {0} {" (values are filled in once, never read as a
    template again) shows as typed on the signed-in page, the admin list and the person's page."""
    seed = make_admin(store)
    name = "{t[sign_out]} {app_name} {0} {"
    store.set_identity("alice", full_name=name)
    cookie = signed_in_as(app, seed, clock)
    app.refresh(clock(), force=True)
    for tag in ("en", "pl"):
        lang = {"Accept-Language": tag}
        signed_in = call(app, "GET", "/login", headers={"Cookie": cookie, **lang})
        home = admin_get(app, cookie, headers=lang)
        person = admin_get(app, cookie, ADMIN + "/user", "name=alice", headers=lang)
        for answer in (signed_in, home, person):
            assert answer.status == 200 and name in answer.text


# --- Catalogues: what the loader does hold ---------------------------------------------------


def test_held_files_that_are_not_catalogues_are_one_log_line_each(tmp_path, store, clock, caplog):
    """HELD: a file with a BOM, one that is not UTF-8, a directory named xx.json, texts that are a
    list, a language name that is a number, a plural rule past nplurals, an `en.json` that would
    replace English, and texts reaching for attributes or other keys ({name.__class__},
    {t[sign_in]}, {0}) are skipped or fall back to English, with log lines, and the server starts."""
    (tmp_path / "aa.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"language": "A", "texts": {}}).encode())
    (tmp_path / "ab.json").write_bytes(b'{"language": "\xff", "texts": {}}')
    (tmp_path / "ac.json").mkdir()
    (tmp_path / "ad.json").write_text(json.dumps({"language": "A", "texts": []}), encoding="utf-8")
    (tmp_path / "ae.json").write_text(json.dumps({"language": 5, "texts": {}}), encoding="utf-8")
    write_catalogue(tmp_path, "af", {}, plural_forms="nplurals=2; plural=n;")
    write_catalogue(tmp_path, "en", {"sign_in": XSS})
    write_catalogue(tmp_path, "de", {"signing_in_as": "{name.__class__}", "not_name": "{t[sign_in]}",
                                     "sign_in": "{0}", "code_label": "{app_name}", "minutes": "{n} Minuten"})
    with caplog.at_level(logging.WARNING, "forward_auth"):
        languages = fa.Languages.load(str(tmp_path))
    assert [catalogue.tag for catalogue in languages] == ["en", "de"]
    assert languages.english.say("sign_in") == "Sign in"
    german = languages.shipped("de")
    assert set(german.texts) == set()  # every text refused, English shows
    app = fa.make_app(settings(), store=store, clock=clock, languages=languages)
    assert call(app, "GET", "/login", headers={"Accept-Language": "de"}).status == 200
    logged = " ".join(record.getMessage() for record in caplog.records)
    for name in ("aa.json", "ab.json", "ac.json", "ad.json", "ae.json", "af.json"):
        assert f"{name} not used" in logged


@pytest.mark.parametrize("tag", TAGS)
def test_held_every_counted_phrase_and_moment_takes_any_number_the_pages_give(tag):
    """HELD: in every shipped language, every counted phrase takes 0, 1, 2, 5, 11, 12, 21, 22, 101,
    999, 1000, 1440 (a 24 h lockout in minutes), 3650 (HISTORY_DAYS' ceiling) and 10**9, and
    human_time() takes every moment from now to ten years on, across unit boundaries."""
    words = SHIPPED.shipped(tag)
    for key, english in fa.ENGLISH.items():
        if isinstance(english, list):
            for n in (0, 1, 2, 5, 11, 12, 21, 22, 101, 999, 1000, 1440, 3650, 10**9):
                assert str(n) in words.count(key, n)
    now = 1_800_000_010.0
    for left in (0, 1, 59, 60, 61, 89, 90, 3599, 3600, 5399, 86399, 86400, 129600, 3650 * 86400, -5):
        assert words.say("moment", when="x", date="y") and fa.human_time(now + left, now, words)


def test_held_cache_headers_on_every_new_answer(app):
    """HELD: every answer that differs by language (pages, the pick's redirect, error pages for
    browsers and their plain twins) says Cache-Control: no-store, so no shared cache keeps one
    visitor's language (or Set-Cookie: lang) for another; pages add Vary: Accept-Language, Cookie."""
    answers = [call(app, "GET", "/login", query="lang=de"), call(app, "GET", "/login", query="lang=de&next=%2Fx"),
               call(app, "GET", "/nowhere", headers=HTML_PAGE), call(app, "GET", "/nowhere"),
               call(app, "POST", "/logout", headers={**FORM, **HTML_PAGE, "Sec-Fetch-Site": "cross-site"}, body=b"a=1")]
    for answer in answers:
        assert answer.header("Cache-Control") == "no-store"
        if "html" in (answer.header("Content-Type") or ""):
            assert set(map(str.strip, answer.header("Vary").lower().split(","))) >= {"accept-language", "cookie"}
