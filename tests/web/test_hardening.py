"""Web access hardening: password changes and disabled users end sessions, throttling by
client address (never an account lockout), trusted proxies only, Secure cookies behind a
proxy. SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from tests.conftest import write_config
from tests.web.conftest import ADMIN_PASSWORD, Web, login_form, make_settings
from triaged.config import ConfigError, WebSettings, from_dict
from triaged.web.auth import add_user, hash_password
from triaged.web.deps import LOGIN_COOKIE, SESSION_COOKIE
from triaged.web.server import serve_in_thread
from triaged.worklist.web_models import AuditEntry

BOB_PASSWORD = "bobs-password-1"


def audit_rows(web: Web) -> list[tuple[str | None, str, str | None, str | None]]:
    with Session(web.engine) as s:
        return [
            (a.user_name, a.action, a.target, a.client)
            for a in s.scalars(sa.select(AuditEntry).order_by(AuditEntry.id))
        ]


def client_from(web: Web, address: str, **overrides: Any) -> TestClient:
    """A client whose requests come from ``address`` (the TCP peer the app sees)."""
    return TestClient(web.app(**overrides), client=(address, 40000), follow_redirects=False)


def basic(name: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{name}:{password}".encode()).decode()}


# ------------------------------------------------------------------------- finding 10
def test_password_change_ends_every_session_of_the_user(web: Web) -> None:
    add_user(web.engine, "bob", "radiologist", BOB_PASSWORD)
    laptop, thief = web.client(), web.client()
    assert login_form(laptop, "bob", BOB_PASSWORD).status_code == 303
    assert login_form(thief, "bob", BOB_PASSWORD).status_code == 303
    admin = web.client("admin")
    assert add_user(web.engine, "bob", "radiologist", "new-password-2", "cli:root") is False
    assert laptop.get("/api/me").status_code == 401
    assert thief.get("/api/me").status_code == 401
    assert admin.get("/api/me").status_code == 200  # other users keep their sessions
    assert login_form(web.client(), "bob", BOB_PASSWORD).status_code == 401
    assert login_form(web.client(), "bob", "new-password-2").status_code == 303
    assert ("cli:root", "user_password_set", "bob", "cli") in audit_rows(web)


def test_password_change_in_the_config_ends_sessions_at_next_start(web: Web, rad_hash: str) -> None:
    from tests.web.conftest import RAD_PASSWORD

    c = web.client()
    assert login_form(c, "rad", RAD_PASSWORD).status_code == 303
    same = web.client(settings=make_settings(web.root, rad_hash))
    same.cookies.set(SESSION_COOKIE, c.cookies[SESSION_COOKIE])
    assert same.get("/api/me").status_code == 200  # a restart alone: still logged in
    restarted = web.client(settings=make_settings(web.root, hash_password("rads-new-password")))
    restarted.cookies.set(SESSION_COOKIE, c.cookies[SESSION_COOKIE])
    assert restarted.get("/api/me").status_code == 401
    assert c.get("/api/me").status_code == 401  # in every process sharing the database
    assert login_form(restarted, "rad", "rads-new-password").status_code == 303


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triaged.cli", "web", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_disable_user_ends_sessions_and_logins_enable_restores(web: Web, rad_hash: str) -> None:
    add_user(web.engine, "bob", "radiologist", BOB_PASSWORD)
    config = write_config(
        web.root / "config.toml",
        {
            "database": {"url": web.engine.url.render_as_string(hide_password=False)},
            "web": {"users": [{"name": "rad", "role": "radiologist", "password_hash": rad_hash}]},
        },
    )
    browser = web.client()
    assert login_form(browser, "bob", BOB_PASSWORD).status_code == 303
    closed = web.client(settings=make_settings(web.root, rad_hash, open_metrics=False))
    assert closed.get("/metrics", headers=basic("bob", BOB_PASSWORD)).status_code == 200

    out = _cli(config, "disable-user", "bob")
    assert out.returncode == 0, out.stderr
    assert "disabled" in out.stdout
    assert browser.get("/api/me").status_code == 401
    assert login_form(web.client(), "bob", BOB_PASSWORD).status_code == 401
    assert closed.get("/metrics", headers=basic("bob", BOB_PASSWORD)).status_code == 401
    rows = audit_rows(web)
    assert any(
        r[1] == "user_disabled" and r[2] == "bob" and (r[0] or "").startswith("cli") for r in rows
    ), rows

    out = _cli(config, "enable-user", "bob")
    assert out.returncode == 0, out.stderr
    assert login_form(web.client(), "bob", BOB_PASSWORD).status_code == 303
    assert any(r[1] == "user_enabled" and r[2] == "bob" for r in audit_rows(web))

    for name, why in (("rad", "[web] users"), ("nobody", "no database user")):
        out = _cli(config, "disable-user", name)
        assert out.returncode == 2 and why in out.stderr, out.stderr


# ------------------------------------------------------------------------- finding 11
def test_failures_from_one_address_never_lock_the_account_out(web: Web, rad_hash: str) -> None:
    attacker = client_from(web, "198.51.100.7")
    codes = [login_form(attacker, "ann", f"guess-{i:04d}").status_code for i in range(20)]
    allowed = web.settings.web.login_failures_allowed
    assert codes == [401] * allowed + [429] * (20 - allowed)
    r = login_form(attacker, "ann", ADMIN_PASSWORD)
    assert r.status_code == 429 and "Too many failed logins" in r.text
    assert 1 <= int(r.headers["retry-after"]) <= web.settings.web.login_backoff_seconds
    assert attacker.get("/api/me").status_code == 401
    # the real admin, elsewhere, logs in; a typo there is an ordinary failure, not a 429
    assert login_form(client_from(web, "192.0.2.10"), "ann", "typo-password").status_code == 401
    office = client_from(web, "192.0.2.11")
    assert login_form(office, "ann", ADMIN_PASSWORD).status_code == 303
    assert office.get("/api/me").json()["name"] == "ann"
    actions = [a for _, a, _, _ in audit_rows(web)]
    assert actions.count("login_failed") == allowed + 1
    assert actions.count("login_throttled") == 20 - allowed + 1

    # HTTP Basic counts and is throttled by address the same way
    closed = make_settings(web.root, rad_hash, open_metrics=False)
    r = client_from(web, "198.51.100.7", settings=closed).get(
        "/metrics", headers=basic("ann", ADMIN_PASSWORD)
    )
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    r = client_from(web, "192.0.2.12", settings=closed).get(
        "/metrics", headers=basic("ann", ADMIN_PASSWORD)
    )
    assert r.status_code == 200


def test_backoff_doubles_and_is_capped_account_delay_stays_short() -> None:
    from triaged.web.queries import account_delay, address_backoff

    web = WebSettings(
        login_failures_allowed=5,
        login_backoff_seconds=30,
        login_backoff_max_seconds=900,
        login_account_delay_max_seconds=2,
    )
    assert [address_backoff(n, web) for n in (0, 4, 5, 6, 7, 10, 1000)] == [
        0,
        0,
        30,
        60,
        120,
        900,
        900,
    ]
    delays = [account_delay(n, web) for n in (0, 4, 5, 6, 100, 10**6)]
    assert delays[:2] == [0, 0] and 0 < delays[2] < delays[3] and delays[-1] == 2


def test_trusted_proxies_must_be_addresses(tmp_path: Path) -> None:
    ok = from_dict({"web": {"trusted_proxies": ["10.0.0.0/8", "::1", "192.0.2.1"]}}, tmp_path, {})
    assert ok.web.trusted_proxies == ["10.0.0.0/8", "::1", "192.0.2.1"]
    for bad in ("*", "proxy.example"):
        with pytest.raises(ConfigError, match="trusted_proxies"):
            from_dict({"web": {"trusted_proxies": [bad]}}, tmp_path, {})


def test_old_lockout_keys_name_their_replacement(tmp_path: Path) -> None:
    for key, new in (
        ("max_failed_logins", "login_failures_allowed"),
        ("lockout_minutes", "login_backoff_seconds"),
    ):
        with pytest.raises(ConfigError, match=f"{key} was replaced by {new}"):
            from_dict({"web": {key: 5}}, tmp_path, {})


@pytest.fixture
def real_server(web: Web) -> Any:
    """Serve an app built from ``settings`` with the real uvicorn, on a free port."""
    started: list[Any] = []

    def start(**web_keys: Any) -> str:
        settings = make_settings(web.root, web.settings.web.users[0].password_hash, **web_keys)
        server = serve_in_thread(
            web.app(settings=settings), "127.0.0.1", 0, trusted_proxies=settings.web.trusted_proxies
        )
        started.append(server)
        return server.url

    yield start
    for s in started:
        s.stop()


def _real_login(url: str, password: str, headers: dict[str, str]) -> httpx.Response:
    with httpx.Client(base_url=url, follow_redirects=False, headers=headers) as c:
        page = c.get("/login")
        token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
        # sent by hand: a Secure cookie (X-Forwarded-Proto https) is not replayed over http
        nonce = page.cookies[LOGIN_COOKIE]
        return c.post(
            "/login",
            data={"username": "rad", "password": password, "csrf_token": token, "next": "/"},
            headers={"Cookie": f"{LOGIN_COOKIE}={nonce}"},
        )


def test_forwarded_headers_ignored_unless_the_proxy_is_trusted(web: Web, real_server: Any) -> None:
    from tests.web.conftest import RAD_PASSWORD

    forged = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    url = real_server()
    assert _real_login(url, "wrong-password", forged).status_code == 401
    r = _real_login(url, RAD_PASSWORD, forged)
    assert r.status_code == 303 and "secure" not in r.headers["set-cookie"].lower()
    clients = [c for _, a, _, c in audit_rows(web) if a.startswith("login")]
    assert clients == ["127.0.0.1", "127.0.0.1"]

    proxied = real_server(trusted_proxies=["127.0.0.1"])
    assert _real_login(proxied, "wrong-password", forged).status_code == 401
    r = _real_login(proxied, RAD_PASSWORD, forged)
    # behind a trusted TLS-terminating proxy the session cookie is Secure ("auto")
    assert r.status_code == 303 and "; secure" in r.headers["set-cookie"].lower()
    clients = [c for _, a, _, c in audit_rows(web) if a.startswith("login")]
    assert clients[2:] == ["203.0.113.9", "203.0.113.9"]


# ------------------------------------------------------------------------- finding 12
@pytest.mark.parametrize(
    ("mode", "scheme", "secure"),
    [
        (True, "http", True),
        (False, "https", False),
        ("auto", "http", False),
        ("auto", "https", True),
    ],
)
def test_secure_cookies_setting(
    web: Web, rad_hash: str, mode: Any, scheme: str, secure: bool
) -> None:
    from tests.web.conftest import RAD_PASSWORD

    app = web.app(settings=make_settings(web.root, rad_hash, secure_cookies=mode))
    c = TestClient(app, base_url=f"{scheme}://testserver", follow_redirects=False)
    page = c.get("/login")
    assert ("; secure" in page.headers["set-cookie"].lower()) is secure
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    r = c.post(
        "/login",
        data={"username": "rad", "password": RAD_PASSWORD, "csrf_token": token},
        headers={"Cookie": f"{LOGIN_COOKIE}={page.cookies[LOGIN_COOKIE]}"},
    )
    assert r.status_code == 303
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE))
    assert ("; secure" in cookie.lower()) is secure
