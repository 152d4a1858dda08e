"""Pages in the visitor's language (SPEC 4.0): the shipped catalogues, Accept-Language negotiation,
the visitor's own pick (the `lang` cookie), hostile values never echoed, every page in every
language, plural forms, and the check path untouched. In-process through wsgiref's validator;
the real browser's side is in test_e2e.py (test_a_browser_in_german_…)."""

import html.parser
import json
import logging
import os
import re
import string
import urllib.parse

import pytest

import forward_auth as fa
from conftest import code_at, csrf_token_of, wrong_code_for
from test_forward_auth import (
    ADMIN,
    FORM,
    SAME_ORIGIN,
    add_user,
    admin_get,
    admin_post,
    call,
    check,
    device_of,
    fresh_cookie,
    invite,
    login,
    make_admin,
    session_cookie,
    settings,
)

FOLDER = os.path.join(os.path.dirname(os.path.abspath(fa.__file__)), "languages")
REQUIRED = ("de", "fr", "es", "it", "nl", "pt", "pl", "sv", "cs", "ja")
SHIPPED = fa.Languages.load()
TAGS = [catalogue.tag for catalogue in SHIPPED]


def catalogue_file(tag):
    with open(os.path.join(FOLDER, f"{tag}.json"), encoding="utf-8") as file:
        return json.load(file)


@pytest.fixture
def logged_in(app, alice, clock):
    app.refresh(clock(), force=True)
    return session_cookie(app, login(app, code_at(alice, clock())))


def fields(text):
    return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}


# --- The catalogues ---------------------------------------------------------


def test_english_and_at_least_the_ten_languages_are_shipped_each_a_file_of_its_own():
    files = sorted(name for name in os.listdir(FOLDER) if name.endswith(".json"))
    assert {f"{tag}.json" for tag in REQUIRED} <= set(files)
    assert set(TAGS) == {"en", *(name[:-5] for name in files)}
    names = {catalogue.tag: catalogue.name for catalogue in SHIPPED}
    assert names["de"] == "Deutsch" and names["ja"] == "日本語" and names["cs"] == "Čeština"


@pytest.mark.parametrize("tag", sorted(set(TAGS) - {"en"}))
def test_every_catalogue_has_every_key_with_the_same_placeholders(tag):
    data = catalogue_file(tag)
    texts = data["texts"]
    count = int(re.search(r"nplurals\s*=\s*(\d)", data["plural_forms"]).group(1))
    fa.plural_rule(data["plural_forms"])  # the rule parses and stays within nplurals
    assert set(texts) == set(fa.ENGLISH), "missing or unknown keys"
    for key, english in fa.ENGLISH.items():
        value = texts[key]
        if isinstance(english, list):
            assert isinstance(value, list) and len(value) == count, key
            assert all(fields(form) == fields(english[-1]) for form in value), key
        elif key in fa.WORD_LISTS:
            assert len(value.split()) == fa.WORD_LISTS[key], key
        else:
            assert isinstance(value, str) and value.strip() and fields(value) == fields(english), key
    loaded = SHIPPED.shipped(tag)
    assert set(loaded.texts) == set(fa.ENGLISH), "the loader itself fell back to English somewhere"


@pytest.mark.parametrize("tag, n, expected", [
    ("en", 1, "1 minute"), ("en", 2, "2 minutes"),
    ("pl", 1, "1 minut"), ("pl", 2, "2 minuty"), ("pl", 5, "5 minut"), ("pl", 12, "12 minut"), ("pl", 22, "22 minuty"),
    ("pl", 25, "25 minut"),
    ("cs", 1, "1 minut"), ("cs", 3, "3 minuty"), ("cs", 5, "5 minut"), ("cs", 22, "22 minut"),
    ("de", 1, "1 Minute"), ("de", 3, "3 Minuten"),
    ("fr", 1, "1 minute"), ("fr", 2, "2 minutes"),
    ("ja", 1, "1分"), ("ja", 5, "5分"),
])
def test_counted_phrases_use_each_languages_plural_forms(tag, n, expected):
    assert SHIPPED.shipped(tag).count("minutes", n).startswith(expected)


def test_polish_and_czech_have_three_different_forms_and_japanese_one():
    for tag in ("pl", "cs"):
        words = SHIPPED.shipped(tag)
        assert len({words.count("too_many", n).replace(str(n), "N") for n in (1, 2, 5)}) == 3, tag
    assert len(catalogue_file("ja")["texts"]["too_many"]) == 1


def test_a_wait_on_the_login_page_is_counted_in_the_visitors_language(app, alice, clock):
    for _ in range(app.settings.max_login_attempts):
        login(app, wrong_code_for(alice, now=clock()))
    page = call(app, "GET", "/login")
    cookie, token = f"{app.cookies.csrf_name}={page.cookie_value(app.cookies.csrf_name)}", csrf_token_of(page.text)
    body = urllib.parse.urlencode({"otp": "123456", "csrf": token}).encode()
    answer = call(app, "POST", "/login", headers={**FORM, "Cookie": cookie, "Accept-Language": "pl"}, body=body)
    minutes = fa.wait_minutes(int(answer.header("Retry-After")))
    assert answer.status == 429 and fa.escape(SHIPPED.shipped("pl").count("too_many", minutes)) in answer.text


# --- Choosing the language --------------------------------------------------


@pytest.mark.parametrize("header, expected", [
    ("de-DE,de;q=0.9", "de"),
    ("de-AT", "de"),  # RFC 4647 §3.4 lookup: the last subtag cut
    ("de-CH-1901", "de"),
    ("DE-de", "de"),  # tags are case-insensitive (RFC 5646 §2.1.1)
    ("fr-CH, fr;q=0.9, en;q=0.8, de;q=0.7", "fr"),
    ("es", "es"), ("it-IT", "it"), ("nl-BE", "nl"), ("pt-BR", "pt"), ("pl", "pl"), ("sv-FI", "sv"),
    ("cs-CZ", "cs"), ("ja-JP", "ja"),
    ("en;q=0.1, ja", "ja"),  # quality, not order
    ("de;q=0.5, fr;q=0.5", "de"),  # a tie keeps the order given
    ("ja;q=0, de", "de"),  # q=0: not acceptable
    ("ja;q=0", "en"),
    ("de;q=0, de-AT", "en"),  # de refused: de-AT does not fall back to it
    ("*", "en"), ("*, de;q=0.5", "en"),  # `*` is English (SPEC)
    ("xx, tlh", "en"), ("zh-Hant-TW", "en"), ("", "en"),
    ("de;q=1.5, fr", "fr"), ("de;q=abc, fr", "fr"), ("de;q=0.1234, fr;q=0.5", "fr"),  # malformed qvalues: absent
    ("de-x-private", "de"),  # a singleton goes with what follows it
    ("fr;level=1;q=0.8, it;q=0.9", "it"),
    ("  es  ;  q = 0.9 ,  , ;;, ", "es"),
])
def test_accept_language_is_negotiated_as_rfc_9110_says(header, expected):
    assert SHIPPED.negotiate(header).tag == expected


def test_a_header_of_thousands_of_ranges_is_judged_only_so_far(clock):
    header = ",".join(["xx"] * 5000 + ["de"])
    assert SHIPPED.negotiate(header).tag == "en"  # the 5001st range is past what any browser sends
    assert SHIPPED.negotiate("de," + header).tag == "de"


def page_language(response):
    match = re.search(r'<html lang="([^"]*)"( dir="rtl")?>', response.text)
    return match.group(1), response.header("Content-Language")


def test_the_login_page_speaks_the_browsers_language_and_says_so(app):
    for header, tag in (("de-DE,de;q=0.9", "de"), ("es", "es"), ("fr-FR", "fr"), ("ja", "ja")):
        page = call(app, "GET", "/login", headers={"Accept-Language": header})
        assert page.status == 200 and page_language(page) == (tag, tag)
        assert fa.escape(SHIPPED.shipped(tag).say("sign_in")) in page.text
        vary = page.header("Vary") or ""
        assert "accept-language" in vary.lower() and "cookie" in vary.lower()
        assert page.header("Cache-Control") == "no-store"
    assert "Anmelden" in call(app, "GET", "/login", headers={"Accept-Language": "de-AT"}).text


def test_the_visitors_pick_wins_over_the_browser_and_is_kept_for_a_year(app):
    picked = call(app, "GET", "/login", query="lang=ja&next=%2Fdocs", headers={"Accept-Language": "de"})
    assert page_language(picked) == ("ja", "ja")
    line = picked.cookies()["lang"]
    assert line.startswith("lang=ja;") and "Path=/" in line and f"Max-Age={365 * 86400}" in line
    assert "SameSite=Lax" in line and "Domain" not in line
    assert 'name="next" value="/docs"' in picked.text  # the page the pick was made on, still going there
    kept = call(app, "GET", "/login", headers={"Accept-Language": "de", "Cookie": "lang=ja"})
    assert page_language(kept) == ("ja", "ja") and "lang" not in kept.cookies()
    again = call(app, "GET", "/login", query="lang=fr", headers={"Cookie": "lang=ja"})
    assert page_language(again) == ("fr", "fr") and again.cookie_value("lang") == "fr"


def test_the_picked_language_cookie_is_host_only_even_with_a_cookie_domain(store, clock):
    app = fa.make_app(settings(cookie_domain=".example.com", secure_cookies=True), store=store, clock=clock)
    line = call(app, "GET", "/login", query="lang=de", headers={"X-Forwarded-Proto": "https"}).cookies()["lang"]
    assert "Domain" not in line and "Secure" in line and "HttpOnly" in line


def test_the_login_page_offers_every_language_each_in_its_own_name(app):
    page = call(app, "GET", "/login", query="next=%2Fcalendar", headers={"Accept-Language": "de"}).text
    picker = re.search(r'<nav class="langs" aria-label="Sprache">(.*?)</nav>', page).group(1)
    for catalogue in SHIPPED:
        if catalogue.tag == "de":
            assert '<b lang="de" aria-current="true">Deutsch</b>' in picker
        else:
            link = f'<a href="?next=%2Fcalendar&amp;lang={catalogue.tag}" lang="{catalogue.tag}" hreflang="{catalogue.tag}">'
            assert link + fa.escape(catalogue.name) + "</a>" in picker


HOSTILE = [
    '"><script>alert(1)</script>', "de\"onmouseover=alert(1)", "../../etc/passwd", "de\r\nSet-Cookie: x=1",
    "de-DE<", "' or 1=1 --", "x" * 5000, "ja\x00", "%3Cscript%3E", "de;q=1", "de-", "-de", "DE ", "\u00e9",
]


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_a_hostile_lang_value_is_never_echoed_nor_kept(app, value):
    quoted = urllib.parse.quote(value, safe="")
    for response in (
        call(app, "GET", "/login", query="lang=" + quoted),
        call(app, "GET", "/login", headers={"Cookie": "lang=" + quoted}),
        call(app, "GET", "/login", headers={"Accept-Language": value.replace("\r\n", " ").replace("\x00", "")}),
        call(app, "GET", "/nowhere", headers={"Accept": "text/html", "Accept-Language": value[:200].replace("\r\n", "")}),
    ):
        assert response.status in (200, 404)
        tag = page_language(response)[0]
        assert tag in TAGS and response.header("Content-Language") == tag
        assert "lang" not in response.cookies()
        for part in ("<script", "onmouseover", "etc/passwd", "x" * 100, "1=1"):
            assert part not in response.text
    assert page_language(call(app, "GET", "/login", query="lang=DE")) == ("de", "de")
    assert call(app, "GET", "/login", query="lang=DE").cookie_value("lang") == "de"  # the file's own tag


def test_a_shipped_tag_in_the_cookie_wins_over_a_hostile_one_before_it(app):
    page = call(app, "GET", "/login", headers={"Cookie": 'lang="><b>; lang=sv', "Accept-Language": "de"})
    assert page_language(page) == ("sv", "sv")


# --- Missing files and keys, right to left ----------------------------------


def write_catalogue(folder, tag, texts, **meta):
    data = {"language": meta.pop("language", tag), "plural_forms": "nplurals=2; plural=(n != 1);", **meta,
            "texts": texts}
    (folder / f"{tag}.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_without_the_folder_the_module_alone_runs_in_english(store, clock, tmp_path):
    languages = fa.Languages.load(str(tmp_path / "missing"))
    assert [catalogue.tag for catalogue in languages] == ["en"]
    app = fa.make_app(settings(), store=store, clock=clock, languages=languages)
    page = call(app, "GET", "/login", headers={"Accept-Language": "de"})
    assert page.status == 200 and page_language(page) == ("en", "en") and "Sign in" in page.text


def test_a_missing_or_unusable_key_falls_back_to_english_and_a_bad_file_is_one_log_line(
        store, clock, tmp_path, caplog):
    write_catalogue(tmp_path, "de", {"sign_in": "Anmelden", "signed_in_as": "Angemeldet als {nme}",
                                     "minutes": ["{n} Minute"], "code_label": "{app_name.__class__}"})
    (tmp_path / "fr.json").write_text("{not json", encoding="utf-8")
    write_catalogue(tmp_path, "it", {"sign_in": "Accedi"}, plural_forms="nplurals=2; plural=(n > 5 ? 3 : 0);")
    (tmp_path / "notes.txt").write_text("ignored", encoding="utf-8")
    with caplog.at_level(logging.WARNING, "forward_auth"):
        languages = fa.Languages.load(str(tmp_path))
    assert [catalogue.tag for catalogue in languages] == ["en", "de"]
    warnings = [r.getMessage() for r in caplog.records]
    assert any("fr.json not used" in w for w in warnings) and any("it.json not used" in w for w in warnings)
    assert any("language de: English for code_label, minutes, signed_in_as" in w for w in warnings)
    german = languages.shipped("de")
    assert german.say("sign_in") == "Anmelden" and german.say("signed_in_as", name="oma") == "Signed in as oma"
    assert german.count("minutes", 3) == "3 minutes"
    app = fa.make_app(settings(), store=store, clock=clock, languages=languages)
    page = call(app, "GET", "/login", headers={"Accept-Language": "de"})
    assert page_language(page) == ("de", "de") and "Anmelden" in page.text
    assert "Code from your authenticator app" in page.text  # the unusable key, in English


def test_a_right_to_left_language_sets_dir(store, clock, tmp_path):
    write_catalogue(tmp_path, "ar", {"sign_in": "تسجيل الدخول"}, language="العربية", direction="rtl")
    app = fa.make_app(settings(), store=store, clock=clock, languages=fa.Languages.load(str(tmp_path)))
    page = call(app, "GET", "/login", headers={"Accept-Language": "ar-EG"})
    assert '<html lang="ar" dir="rtl">' in page.text and page.header("Content-Language") == "ar"
    assert "تسجيل الدخول" in page.text
    assert '<html lang="en">' in call(app, "GET", "/login").text  # left to right: no dir at all


def test_a_catalogue_cannot_put_markup_into_a_page(store, clock, tmp_path):
    write_catalogue(tmp_path, "de", {"sign_in": "<script>alert(1)</script>", "signed_in_as": "<b>{name}</b>"},
                    language="<i>Deutsch</i>")
    app = fa.make_app(settings(), store=store, clock=clock, languages=fa.Languages.load(str(tmp_path)))
    page = call(app, "GET", "/login", headers={"Accept-Language": "de"}).text
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<i>Deutsch" not in page


# --- Every page in every language -------------------------------------------


class InLanguage:
    """The app as a browser asking for `header` in Accept-Language sees it (every request)."""

    def __init__(self, app, header):
        self.app, self.header = app, header

    def __call__(self, environ, start_response):
        environ["HTTP_ACCEPT_LANGUAGE"] = self.header
        return self.app(environ, start_response)

    def __getattr__(self, name):
        return getattr(self.app, name)


HTML_PAGE = {"Accept": "text/html"}


def every_page(app, store, clock):
    """{page: response} of every page a person sees; `app` speaks one language on every request."""
    pages = {}
    alice = make_admin(store, "alice")
    store.set_identity("alice", full_name="<i>Alice & Co</i>")
    bob = add_user(store, "bob")
    store.set_hosts("bob", ("app1.example.com",))
    dave = add_user(store, "dave")
    app.refresh(clock(), force=True)
    pages["login"] = call(app, "GET", "/login", query="next=https%3A%2F%2Fapp1.example.com%2F")
    pages["wrong code"] = login(app, wrong_code_for(alice, bob, dave, now=clock()))
    signed_in = login(app, code_at(alice, clock()))
    alice_cookie = "; ".join([session_cookie(app, signed_in), device_of(app, signed_in)])
    admin_cookie = "; ".join([alice_cookie, *fresh_cookie(app, signed_in)])
    pages["signed in"] = call(app, "GET", "/login", headers={"Cookie": alice_cookie})
    pages["device bound"] = call(app, "GET", "/login", headers={"Cookie": device_of(app, signed_in)})
    pages["wrong code for"] = login(app, wrong_code_for(alice, now=clock()), extra_cookie=device_of(app, signed_in))
    clock.advance(30)
    bob_in = login(app, code_at(bob, clock()))
    bob_cookie = session_cookie(app, bob_in)
    pages["forbidden"] = check(app, bob_cookie, url="https://app2.example.com/", headers=HTML_PAGE)
    pages["not an admin"] = admin_get(app, bob_cookie)
    login(app, code_at(dave, clock()))
    reset = app.household.invite("dave", fa.COMMAND_LINE, reset_only=True)  # a lost phone: a new link
    pages["reset invitation"] = call(app, "GET", "/login", query="invite=" + reset.token)
    token, _ = invite(store, "carol", now=clock())
    pages["invitation"] = call(app, "GET", "/login", query="invite=" + token)
    press = {"headers": {**FORM, "Cookie": f"{app.cookies.csrf_name}="
                         f"{pages['invitation'].cookie_value(app.cookies.csrf_name)}"},
             "body": urllib.parse.urlencode({"invite": token, "csrf": csrf_token_of(pages["invitation"].text)}).encode()}
    pages["invitation setup"] = call(app, "POST", "/login", **press)
    pages["invitation elsewhere"] = call(app, "POST", "/login", **press)  # no binding cookie: another browser
    pages["invitation gone"] = call(app, "GET", "/login", query="invite=" + "x" * 43)
    pages["fresh code"] = admin_get(app, alice_cookie)
    pages["fresh code refused"] = admin_post(app, alice_cookie, {"action": "fresh", "otp": "000000"},
                                             csrf=csrf_token_of(pages["fresh code"].text))
    store.add_app_token("alice", "calendar", fa.digest("t" * 40), ("*",), clock(), None)
    pages["household"] = admin_get(app, admin_cookie)
    pages["person"] = admin_get(app, admin_cookie, ADMIN + "/user", "name=alice")
    pages["saved"] = admin_get(app, admin_cookie, ADMIN + "/user", "name=alice&done=hosts")
    pages["not deleted"] = admin_post(app, admin_cookie, {"action": "delete", "confirm": "nope"},
                                      ADMIN + "/user", "name=bob")

    def shown(response):
        where = urllib.parse.urlsplit(response.header("Location"))
        return call(app, "GET", where.path, query=where.query, headers={"Cookie": admin_cookie})

    made = admin_post(app, admin_cookie, {"action": "invite", "user": "erin"})
    pages["new invitation"], pages["already shown"] = shown(made), shown(made)
    pages["new token"] = shown(admin_post(app, admin_cookie, {"action": "token", "label": "monitor", "days": "30"},
                                          ADMIN + "/user", "name=bob"))
    pages["history"] = admin_get(app, admin_cookie, ADMIN + "/history")
    pages["history of one"] = admin_get(app, admin_cookie, ADMIN + "/history", "name=alice")
    pages["no such page"] = call(app, "GET", "/nowhere", headers=HTML_PAGE)
    pages["no such method"] = call(app, "PUT", "/login", headers=HTML_PAGE)
    pages["cross-site"] = call(app, "POST", "/login", headers={**FORM, **HTML_PAGE, "Sec-Fetch-Site": "cross-site"},
                               body=b"otp=123456")
    pages["form expired"] = call(app, "POST", "/login", headers={**FORM, **HTML_PAGE}, body=b"otp=123456&csrf=x")
    pages["sign-out form expired"] = call(app, "POST", "/logout", headers={**FORM, **HTML_PAGE, **SAME_ORIGIN},
                                          body=b"all=1&csrf=x")
    pages["no such person"] = admin_get(app, admin_cookie, ADMIN + "/user", "name=nobody", headers=HTML_PAGE)
    return pages


EXPECTED_STATUS = {
    "wrong code": 401, "wrong code for": 401, "forbidden": 403, "not an admin": 403,
    "invitation elsewhere": 410, "invitation gone": 410, "fresh code refused": 401, "not deleted": 400,
    "already shown": 410, "no such page": 404, "no such method": 405, "cross-site": 403, "form expired": 403,
    "sign-out form expired": 403, "no such person": 404,
}
VOID = {"meta", "link", "input", "br", "img", "hr"}


class Balanced(html.parser.HTMLParser):
    """Fails on a tag closed out of order or left open: what an unescaped value would break."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes {self.open[-1:]}"
        self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


def english_phrases():
    """The English texts' own words (placeholders cut out), the longer pieces that would show an
    untranslated text on a page."""
    phrases = set()
    for key, value in fa.ENGLISH.items():
        for text in value if isinstance(value, list) else [value]:
            if key in fa.WORD_LISTS:
                continue
            for literal, *_ in string.Formatter().parse(text):
                literal = literal.strip(" .,:;·()")
                if len(literal) >= 12 and " " in literal:
                    phrases.add(literal)
    return phrases


ENGLISH_PHRASES = english_phrases()


@pytest.mark.parametrize("tag", TAGS)
def test_every_page_is_served_in_every_language_escaped_and_with_no_english_left(store, clock, tag):
    words = SHIPPED.shipped(tag)
    app = InLanguage(fa.make_app(settings(), store=store, clock=clock), tag)
    pages = every_page(app, store, clock)
    own = " ".join(str(value) for value in words.texts.values())
    for name, response in pages.items():
        assert response.status == EXPECTED_STATUS.get(name, 200), (name, response.text[:300])
        assert response.header("Content-Type") == "text/html; charset=utf-8", name
        assert page_language(response) == (tag, tag), name
        parser = Balanced()
        parser.feed(response.text)
        parser.close()
        assert parser.open == [], (name, parser.open)
        assert "<i>Alice" not in response.text, name  # a value is escaped in every language
        text = re.sub(r"\s+", " ", " ".join(parser.text))
        if tag != "en":
            left = [phrase for phrase in ENGLISH_PHRASES if phrase in text and phrase not in own]
            assert not left, (name, left)
    assert "&lt;i&gt;Alice &amp; Co&lt;/i&gt;" in pages["signed in"].text
    replaces = fa.escape(words.say("replaces_old_entry", app_name=app.settings.app_name))
    assert replaces in pages["reset invitation"].text and replaces not in pages["invitation"].text
    assert fa.escape(words.say("wrong_code_for", name="alice")) in pages["wrong code for"].text


def test_names_and_the_app_name_are_never_translated(store, clock):
    app = InLanguage(fa.make_app(settings(app_name="Familie Müller"), store=store, clock=clock), "ja")
    seed = add_user(store, "Anmelden")  # a user named like a German word stays as it is
    app.refresh(clock(), force=True)
    response = login(app, code_at(seed, clock()))
    page = call(app, "GET", "/login", headers={"Cookie": session_cookie(app, response)}).text
    assert "<h1>Familie Müller</h1>" in page and "Anmelden" in page and "ログアウト" in page


# --- "Not NAME?", and after a reset ------------------------------------------


def test_not_name_is_a_quiet_link_styled_post_with_the_csrf_token_under_the_form(app, alice, clock):
    response = login(app, code_at(alice, clock()))
    page = call(app, "GET", "/login", headers={"Cookie": device_of(app, response)}).text
    forget = re.search(r'<form method="post" class="hint">\n<input type="hidden" name="action" value="forget">'
                       r'.*?<input type="hidden" name="csrf" value="[^"]+">\n'
                       r'<button type="submit" class="link">Not alice\?</button>\n</form>', page, re.DOTALL)
    assert forget and page.index("Sign in</button>") < forget.start()
    assert "button.link{width:auto" in page and 'class="quiet">Not' not in page


def test_after_a_reset_the_new_link_says_the_old_entry_no_longer_works(app, store, clock):
    """Issue 27: after a reset, say the old authenticator entry no longer works (not "Wrong code"),
    where that tells a stranger nothing: on the new link's pages, to whoever holds the link. Not
    on the login page of a browser with the person's device cookie: that may be the lost phone
    (test_language_attacks.py). A newcomer's link says nothing of an old entry."""
    oma = add_user(store, "oma")
    app.refresh(clock(), force=True)
    login(app, code_at(oma, clock()))
    reset = app.household.invite("oma", fa.COMMAND_LINE, reset_only=True)
    newcomer = app.household.invite("carol", fa.COMMAND_LINE, new_only=True)
    said = "This link replaces your old entry for Forward Auth in the authenticator app: its codes no longer work."
    first = call(app, "GET", "/login", query="invite=" + reset.token)
    assert first.status == 200 and said in first.text
    press = urllib.parse.urlencode({"invite": reset.token, "csrf": csrf_token_of(first.text)}).encode()
    cookie = f"{app.cookies.csrf_name}={first.cookie_value(app.cookies.csrf_name)}"
    setup = call(app, "POST", "/login", headers={**FORM, "Cookie": cookie}, body=press)
    assert setup.status == 200 and said in setup.text and "<svg" in setup.text
    assert said not in call(app, "GET", "/login", query="invite=" + newcomer.token).text


# --- The check path ---------------------------------------------------------


def test_the_check_path_never_chooses_a_language(app, logged_in, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a language chosen on the check path")

    monkeypatch.setattr(fa.Languages, "choose", refuse)
    monkeypatch.setattr(fa.Languages, "negotiate", refuse)
    for headers in ({"Accept-Language": "de"}, {"Accept-Language": "ja", "Cookie": logged_in + "; lang=fr"}):
        cookie = headers.pop("Cookie", logged_in)
        allowed = check(app, cookie, headers=headers)
        assert allowed.status == 200 and allowed.header("Content-Language") is None
        assert allowed.header("Vary") is None
        assert check(app, None, headers=headers).status == 401


def test_an_error_page_is_for_browsers_and_plain_text_for_everything_else(app):
    page = call(app, "GET", "/nowhere", headers={"Accept": "text/html", "Accept-Language": "de"})
    assert page.status == 404 and page_language(page) == ("de", "de")
    assert fa.escape(SHIPPED.shipped("de").say("not_found")) in page.text
    plain = call(app, "GET", "/nowhere", headers={"Accept-Language": "de"})
    assert plain.status == 404 and plain.body == b"Not found\n" and plain.header("Content-Language") is None


# --- Installed ----------------------------------------------------------------


def test_installed_with_pip_as_the_systemd_recipe_does_the_languages_come_along(tmp_path):
    """The README's systemd recipe pip-installs the checkout into a venv: the module lands in
    site-packages, the languages under the venv's share/ (pyproject's data-files), where it looks."""
    import shutil
    import subprocess
    import venv

    source = tmp_path / "checkout"
    source.mkdir()
    for name in ("forward_auth.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(os.path.dirname(FOLDER), name), source)
    shutil.copytree(FOLDER, source / "languages")
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
                   check=True, capture_output=True, timeout=300)
    script = "import forward_auth as f; print(f.__file__); print(' '.join(c.tag for c in f.Languages.load()))"
    shown = subprocess.run([python, "-c", script],
                           cwd=tmp_path, check=True, capture_output=True, text=True, timeout=60).stdout.split("\n")
    assert "site-packages" in shown[0]
    assert set(shown[1].split()) == set(TAGS)
