"""Logins, sessions, roles and CSRF: who may do what (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from tests.web.conftest import ADMIN_PASSWORD, RAD_PASSWORD, Web, login_form
from triaged.web.auth import UserError, add_user, disable_user
from triaged.web.deps import SESSION_COOKIE
from triaged.worklist.web_models import AuditEntry, User, WebSession

API_GETS = [
    "/api/me",
    "/api/studies",
    "/api/studies/1.2.3",
    "/api/studies/1.2.3/feedback",
    "/api/studies/1.2.3/images/heatmap",
    "/api/labels",
    "/api/admin/models",
    "/api/admin/destinations",
    "/api/admin/health",
    "/api/admin/audit",
]
API_POSTS = [
    "/api/studies/1.2.3/feedback",
    "/api/admin/models/fusion/promote",
    "/api/admin/models/fusion/rollback",
    "/api/admin/destinations/pacs/echo",
]
ADMIN_GETS = [
    "/api/labels",
    "/api/admin/models",
    "/api/admin/destinations",
    "/api/admin/health",
    "/api/admin/audit",
]


def test_login_form_sets_strict_httponly_cookie(web: Web) -> None:
    c = web.client()
    r = login_form(c, "rad", RAD_PASSWORD, "/?state=SCORED")
    assert r.status_code == 303 and r.headers["location"] == "/?state=SCORED"
    cookie = next(h for h in r.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP here; Secure when [web] tls is set
    me = c.get("/api/me").json()
    assert me["name"] == "rad" and me["role"] == "radiologist" and len(me["csrf_token"]) > 20
    # only a hash of the token is stored
    with Session(web.engine) as s:
        row = s.scalars(sa.select(WebSession)).one()
    assert row.token_sha256 not in c.cookies[SESSION_COOKIE]


def test_database_user_login_and_audit(web: Web) -> None:
    c = web.client()
    assert login_form(c, "ann", ADMIN_PASSWORD).status_code == 303
    assert c.get("/api/me").json()["role"] == "admin"
    bad = web.client()
    r = login_form(bad, "ann", "wrong-password")
    assert r.status_code == 401 and "wrong password" in r.text
    assert bad.get("/api/me").status_code == 401
    r = login_form(bad, "nobody", "whatever-123")
    assert r.status_code == 401
    with Session(web.engine) as s:
        actions = [
            (a.user_name, a.action, a.client)
            for a in s.scalars(sa.select(AuditEntry).order_by(AuditEntry.id))
            if a.action.startswith("login")
        ]
    assert actions == [
        ("ann", "login", "testclient"),
        ("ann", "login_failed", "testclient"),
        ("nobody", "login_failed", "testclient"),
    ]


def test_login_without_form_token_is_refused(web: Web) -> None:
    c = web.client()
    r = c.post("/login", data={"username": "rad", "password": RAD_PASSWORD, "csrf_token": "x"})
    assert r.status_code == 403 and SESSION_COOKIE not in c.cookies
    # a token from another browser (no matching cookie) is refused too
    other = web.client()
    page = other.get("/login").text
    token = page.split('name="csrf_token" value="')[1].split('"')[0]
    r = c.post("/login", data={"username": "rad", "password": RAD_PASSWORD, "csrf_token": token})
    assert r.status_code == 403


def test_next_cannot_leave_the_site(web: Web) -> None:
    r = login_form(web.client(), "rad", RAD_PASSWORD, "//evil.example/x")
    assert r.headers["location"] == "/"


def test_everything_needs_a_login(web: Web) -> None:
    c = web.client()
    for url in API_GETS:
        assert c.get(url).status_code == 401, url
    for url in API_POSTS:
        assert c.post(url, json={}).status_code == 401, url
    for url in ["/", "/studies/1.2.3", "/admin", "/?state=SCORED"]:
        r = c.get(url)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=%2F"), url
    assert c.get("/login").status_code == 200
    assert c.get("/static/app.css").status_code == 200


def test_radiologist_refused_admin(web: Web) -> None:
    c = web.client("radiologist")
    for url in ADMIN_GETS:
        assert c.get(url).status_code == 403, url
    for url in API_POSTS[1:]:
        r = c.post(url, json={"version": "v1"})
        assert r.status_code == 403, url
    r = c.get("/admin")
    assert r.status_code == 403 and "administrators" in r.text
    r = c.post("/admin/models/fusion/rollback", data={"csrf_token": c.headers["X-CSRF-Token"]})
    assert r.status_code == 403
    assert web.echoes == []


def test_csrf_required_on_api_posts(web: Web, seed) -> None:  # type: ignore[no-untyped-def]
    uid = seed(1, scored={"fusion": 0.9, "cbam": 0.8, "flag": True, "priority": 10})
    c = web.client("admin")
    token = c.headers.pop("X-CSRF-Token")
    for url, body in [
        (f"/api/studies/{uid}/feedback", {"verdict": "confirm"}),
        ("/api/admin/destinations/pacs/echo", {}),
        ("/api/admin/models/fusion/rollback", {}),
    ]:
        r = c.post(url, json=body)
        assert r.status_code == 403 and "CSRF" in r.json()["detail"], url
        r = c.post(url, json=body, headers={"X-CSRF-Token": token[:-2] + "xx"})
        assert r.status_code == 403, url
    assert web.echoes == []
    r = c.post(
        f"/api/studies/{uid}/feedback", json={"verdict": "confirm"}, headers={"X-CSRF-Token": token}
    )
    assert r.status_code == 201


def test_csrf_required_on_forms(web: Web, seed) -> None:  # type: ignore[no-untyped-def]
    uid = seed(1, scored={"fusion": 0.9, "flag": True})
    c = web.client("radiologist")
    r = c.post(f"/studies/{uid}/feedback", data={"verdict": "confirm"})
    assert r.status_code == 403 and "expired" in r.text
    r = c.post(f"/studies/{uid}/feedback", data={"verdict": "confirm", "csrf_token": "nope"})
    assert r.status_code == 403
    r = c.post("/logout", data={})
    assert r.status_code == 403
    assert c.get("/api/me").status_code == 200  # still logged in
    assert c.get(f"/api/studies/{uid}/feedback").json() == []


def test_logout_ends_the_session_everywhere(web: Web) -> None:
    c = web.client()
    login_form(c, "rad", RAD_PASSWORD)
    stolen = c.cookies[SESSION_COOKIE]
    csrf = c.get("/api/me").json()["csrf_token"]
    r = c.post("/logout", data={"csrf_token": csrf})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    other = web.client()
    other.cookies.set(SESSION_COOKIE, stolen)
    assert other.get("/api/me").status_code == 401


def test_tampered_expired_and_disabled_sessions(web: Web) -> None:
    c = web.client("admin")
    assert c.get("/api/me").status_code == 200
    value = c.cookies[SESSION_COOKIE]
    c.cookies.set(SESSION_COOKIE, value[:-3] + ("AAA" if not value.endswith("AAA") else "BBB"))
    assert c.get("/api/me").status_code == 401
    c.cookies.set(SESSION_COOKIE, value)
    assert disable_user(web.engine, "ann")
    assert c.get("/api/me").status_code == 401
    # expiry: a zero lifetime makes a session that is dead on arrival
    short = web.client(session_lifetime=timedelta(seconds=-1))
    ctx = short.app.state.ctx  # type: ignore[attr-defined]
    from triaged.web.auth import Principal

    cookie, _ = ctx.sessions.create(Principal("rad", "radiologist"), None)
    short.cookies.set(SESSION_COOKIE, cookie)
    assert short.get("/api/me").status_code == 401


def test_a_session_signed_with_another_key_is_refused(web: Web) -> None:
    c = web.client("radiologist")
    other = web.settings.model_copy(
        update={"web": web.settings.web.model_copy(update={"secret_key": "another-key-xyz"})}
    )
    c2 = web.client(settings=other)
    c2.cookies.set(SESSION_COOKIE, c.cookies[SESSION_COOKIE])
    assert c2.get("/api/me").status_code == 401


def test_add_user_hashes_and_validates(web: Web) -> None:
    assert add_user(web.engine, "bob", "radiologist", "long-enough-1") is True
    assert add_user(web.engine, "bob", "admin", "another-pass-2") is False
    with Session(web.engine) as s:
        bob = s.scalars(sa.select(User).where(User.name == "bob")).one()
    assert bob.role == "admin" and bob.password_hash.startswith("$argon2id$")
    assert "another-pass-2" not in bob.password_hash
    with pytest.raises(UserError, match="role"):
        add_user(web.engine, "eve", "root", "long-enough-1")
    with pytest.raises(UserError, match="8 characters"):
        add_user(web.engine, "eve", "radiologist", "short")
    c = web.client()
    assert login_form(c, "bob", "long-enough-1").status_code == 401
    assert login_form(c, "bob", "another-pass-2").status_code == 303


def test_healthz_and_metrics_closed_unless_configured(web: Web, rad_hash: str) -> None:
    from tests.web.conftest import make_settings

    closed = make_settings(web.root, rad_hash, open_health=False, open_metrics=False)
    c = web.client(settings=closed)
    for url in ("/healthz", "/metrics"):
        r = c.get(url)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), url
        bad = base64.b64encode(b"rad:wrong-password").decode()
        assert c.get(url, headers={"Authorization": f"Basic {bad}"}).status_code == 401
        good = base64.b64encode(f"rad:{RAD_PASSWORD}".encode()).decode()
        assert c.get(url, headers={"Authorization": f"Basic {good}"}).status_code == 200, url
    logged = web.client("radiologist", settings=closed)
    assert logged.get("/metrics").status_code == 200
    assert logged.get("/healthz").status_code == 200
    opened = web.client()
    assert opened.get("/healthz").status_code == 200
    assert opened.get("/metrics").status_code == 200


def test_repeated_failed_logins_are_throttled(web: Web, rad_hash: str) -> None:
    """Beyond login_failures_allowed failures an address waits, even with the right password
    (the account stays open from elsewhere: tests/web/test_hardening.py)."""
    import base64

    c = web.client()
    for _ in range(web.settings.web.login_failures_allowed):
        assert login_form(c, "ann", "wrong-password").status_code == 401
    r = login_form(c, "ann", ADMIN_PASSWORD)
    assert r.status_code == 429 and "Too many failed logins" in r.text
    assert int(r.headers["retry-after"]) >= 1
    assert c.get("/api/me").status_code == 401
    # HTTP Basic (Prometheus, probes) from the same address is throttled by the same count
    basic = "Basic " + base64.b64encode(f"ann:{ADMIN_PASSWORD}".encode()).decode()
    from fastapi.testclient import TestClient

    from tests.web.conftest import make_settings
    from triaged.web.app import create_app

    closed = TestClient(
        create_app(make_settings(web.root, rad_hash, open_metrics=False), web.engine)
    )
    assert closed.get("/metrics", headers={"Authorization": basic}).status_code == 429
    with Session(web.engine) as s:
        actions = [a.action for a in s.scalars(sa.select(AuditEntry).order_by(AuditEntry.id))]
    assert actions.count("login_failed") == web.settings.web.login_failures_allowed
    assert "login_throttled" in actions
