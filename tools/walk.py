"""The walk of a request: which functions of a forward_auth.py one request calls, and how often.

    python tools/walk.py forward_auth.py            # this version
    python tools/walk.py /tmp/fa30/forward_auth.py  # another (git show 9eb4400:forward_auth.py)

Walks a POST /login with the right code, a /verify of a user with a host list (a path not seen
before), a /verify past half the idle lifetime (RENEW) and the GET /login?renew=1 that follows,
in-process with an injected clock, counting calls with sys.setprofile.
"""
import collections
import importlib.util
import io
import os
import re
import sys
import tempfile
import urllib.parse

path = os.path.abspath(sys.argv[1])
spec = importlib.util.spec_from_file_location("fa", path); fa = importlib.util.module_from_spec(spec); spec.loader.exec_module(fa)
import pyotp

d = tempfile.mkdtemp()
store = fa.Store(os.path.join(d, "a.db"))
seed = fa.new_seed()
now = [1_800_000_010.0]
store.add_user("alice", seed, now[0] - 3600)
store.set_hosts("alice", ["app1.example.com", "*.media.example.com"])
app = fa.make_app(fa.Settings(secure_cookies=False, session_ttl=1000, session_max=3000), store=store, clock=lambda: now[0])
def call(method, p, query="", headers=None, body=b""):
    env = {"REQUEST_METHOD": method, "PATH_INFO": p, "QUERY_STRING": query, "REMOTE_ADDR": "127.0.0.1",
           "HTTP_HOST": "app1.example.com", "wsgi.input": io.BytesIO(body), "wsgi.url_scheme": "http", "SERVER_NAME": "x"}
    if body: env["CONTENT_LENGTH"] = str(len(body))
    for k, v in (headers or {}).items():
        k = k.upper().replace("-", "_"); env[k if k == "CONTENT_TYPE" else "HTTP_" + k] = v
    out = {}
    def sr(s, h, e=None): out["s"], out["h"] = s, h
    b = b"".join(app(env, sr)); return out["s"], out["h"], b
def walk(label, fn):
    counts = collections.Counter()
    def prof(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == path:
            counts[frame.f_code.co_name] += 1
    sys.setprofile(prof); r = fn(); sys.setprofile(None)
    print(f"## {label}: {sum(counts.values())} calls")
    print(", ".join(f"{n}×{c}" if c > 1 else n for n, c in counts.most_common()))
    return r
s, h, b = call("GET", "/login")
nonce = next(v.split(";")[0] for k, v in h if k == "Set-Cookie" and v.startswith("auth_token_csrf="))
csrf = re.search(rb'name="csrf" value="([^"]+)"', b).group(1).decode()
code = pyotp.TOTP(seed).generate_otp(fa.step_at(now[0]))
form = urllib.parse.urlencode({"otp": code, "next": "https://app1.example.com/x", "csrf": csrf}).encode()
s, h, b = walk("POST /login (right code)", lambda: call("POST", "/login", headers={"Content-Type": "application/x-www-form-urlencoded", "Cookie": nonce}, body=form))
cookie = next(v.split(";")[0] for k, v in h if k == "Set-Cookie" and v.startswith("auth_token="))
fwd = {"Cookie": cookie, "X-Forwarded-Host": "app1.example.com", "X-Forwarded-Proto": "https", "X-Forwarded-Uri": "/x"}
call("GET", "/verify", headers=fwd)
walk("GET /verify (valid cookie, host list, seen before)", lambda: call("GET", "/verify", headers=dict(fwd, **{"X-Forwarded-Uri": "/y/1"})))
now[0] += 501
s, h, b = walk("GET /verify (past half: RENEW)", lambda: call("GET", "/verify", headers=dict(fwd, Accept="text/html")))
loc = dict(h)["Location"]
q = urllib.parse.urlsplit(loc).query
s, h, b = walk("GET /login?renew=1", lambda: call("GET", "/login", query=q, headers={"Cookie": cookie}))
print(s)
