"""Helpers both test files use (test_forward_auth.py and test_e2e.py import them from here):
an injectable clock, forward-auth on real waitress, TOTP codes, and a login form's CSRF token."""

import http.client
import re
import threading

import pyotp
import pytest

import forward_auth as fa

T0 = 1_800_000_000.0  # a fixed "now", mid-step: 1_800_000_000 % 30 == 0, so add 10 s below
NOW = T0 + 10


class FakeClock:
    def __init__(self, now=NOW):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.header_list = headers
        self.body = body

    def header(self, name):
        values = self.headers_named(name)
        return values[0] if values else None

    def headers_named(self, name):
        return [v for k, v in self.header_list if k.lower() == name.lower()]

    def cookies(self):
        """{name: full Set-Cookie line}."""
        return {line.split("=", 1)[0]: line for line in self.headers_named("Set-Cookie")}

    def cookie_value(self, name):
        """The value a Set-Cookie gives `name`, or None if the response sets no such cookie."""
        line = self.cookies().get(name)
        return None if line is None else line.split(";", 1)[0].split("=", 1)[1]

    @property
    def text(self):
        return self.body.decode("utf-8")


def code_at(seed, now, offset=0):
    return pyotp.TOTP(seed).generate_otp(fa.step_at(now) + offset)


def csrf_token_of(page_text):
    """The CSRF token a form carries."""
    return re.search(r'name="csrf" value="([^"]+)"', page_text).group(1)


class Server:
    """The app on real waitress (production arguments), port 0, in a thread."""

    def __init__(self, app, **overrides):
        self.app = app
        self.server = fa.create_server(app, app.settings, host="127.0.0.1", port=0, **overrides)
        self.port = self.server.effective_port
        self._start()

    def _start(self):
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        # waitress's own loop (what server.run() does), one poll at a time, so that stop() only
        # sets a flag: the loop thread then closes its own channels. Stopping by pulling waitress's
        # trigger from the test thread once failed in CI with EBADF on the trigger's pipe (not
        # reproduced in ten local runs of the suite), and left the test's real outcome unreported.
        while not self._stopping.is_set():
            self.server.asyncore.loop(timeout=0.05, map=self.server._map,
                                      use_poll=self.server.adj.asyncore_use_poll, count=1)
        for channel in list(self.server._map.values()):
            channel.close()

    def request(self, method, path, headers=None, body=None, conn=None):
        own = conn is None
        conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return Response(response.status, response.getheaders(), data)
        finally:
            if own:
                conn.close()

    def stop(self):
        self._stopping.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the server's loop did not stop within 10 s"
        self.server.task_dispatcher.shutdown()


def wrong_code_for(*seeds, now=NOW):
    codes = {code_at(seed, now, offset) for seed in seeds for offset in (-1, 0, 1)}
    return next(c for c in ("000000", "111111", "222222", "333333") if c not in codes)


# Fixtures every test file shares: a database file of the test's own, its Store, and a clock.


@pytest.fixture
def db_path(tmp_path):
    return str(tmp_path / "auth.db")


@pytest.fixture
def store(db_path):
    s = fa.Store(db_path)
    yield s
    s.close()


@pytest.fixture
def clock():
    return FakeClock()
