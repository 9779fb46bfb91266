"""Users, password hashes and login sessions of the web front end.

Passwords are stored only as argon2id hashes (salted by construction). Users come from
``[web] users`` in config.toml (hash given there) or from the ``web_users`` table
(``add_user``); a config user wins over a database user of the same name, so an admin
locked out of the database can always get back in through the config.

A session is a random token: the cookie carries it signed with ``secret_key``
(itsdangerous), the database keeps only its SHA-256 together with the CSRF token of the
session (the synchronizer token every state-changing request must echo). Server-side
sessions are what let several ``serve`` processes share logins and let a logout or a
disabled user end a session immediately.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from itsdangerous import BadSignature, Signer, URLSafeTimedSerializer
from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from triaged.config import WebUser
from triaged.worklist.models import utcnow
from triaged.worklist.web_models import AuditEntry, User, WebSession

log = logging.getLogger("triaged.web")
ROLES = ("radiologist", "admin")
MIN_PASSWORD_LENGTH = 8
_hasher = PasswordHasher()
# Verified against when the user name is unknown, so that a wrong name and a wrong
# password take the same time (no user enumeration by timing).
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class UserError(ValueError):
    """A user-management mistake (bad role, short password): one line for the CLI."""


@dataclass(frozen=True)
class Principal:
    """Who is making a request, as far as authorisation cares."""

    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class LoginSession:
    principal: Principal
    csrf_token: str


def hash_password(password: str) -> str:
    """An argon2id hash for ``[web] users`` entries or the database."""
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"a password has at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def add_user(
    engine: Engine,
    name: str,
    role: str,
    password: str,
    actor: str | None = None,
    client: str | None = "cli",
) -> bool:
    """Create a database user, or reset the role and password of an existing one.

    Resetting ends every session of the user: whoever knew the old password (or holds a
    stolen cookie) is out at once. Returns True when the user is new. Audited.
    """
    name = name.strip()
    if not name or len(name) > 64:
        raise UserError("a user name has 1-64 characters")
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    password_hash = hash_password(password)
    with Session(engine) as s, s.begin():
        user = s.scalars(select(User).where(User.name == name)).one_or_none()
        if user is None:
            s.add(
                User(
                    name=name,
                    role=role,
                    password_hash=password_hash,
                    disabled=False,
                    created_at=utcnow(),
                )
            )
            _audit(s, actor, "user_created", name, client, role)
            return True
        user.role = role
        user.password_hash = password_hash
        user.disabled = False
        ended = _end_sessions(s, name)
        _audit(s, actor, "user_password_set", name, client, f"{role}; {ended} session(s) ended")
        return False


def disable_user(
    engine: Engine, name: str, actor: str | None = None, client: str | None = "cli"
) -> bool:
    """Disable a database user and end their sessions; False if there is no such user."""
    with Session(engine) as s, s.begin():
        user = s.scalars(select(User).where(User.name == name)).one_or_none()
        if user is None:
            return False
        user.disabled = True
        ended = _end_sessions(s, name)
        _audit(s, actor, "user_disabled", name, client, f"{ended} session(s) ended")
        return True


def enable_user(
    engine: Engine, name: str, actor: str | None = None, client: str | None = "cli"
) -> bool:
    """Let a disabled database user log in again; False if there is no such user."""
    with Session(engine) as s, s.begin():
        user = s.scalars(select(User).where(User.name == name)).one_or_none()
        if user is None:
            return False
        user.disabled = False
        _audit(s, actor, "user_enabled", name, client, None)
        return True


CONFIG_PASSWORD_ACTION = "config_password_seen"


def _fingerprint(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()[:16]


def end_sessions_of_changed_config_users(
    engine: Engine, config_users: Sequence[WebUser]
) -> list[str]:
    """End the sessions of ``[web] users`` whose password hash changed in the config.

    A config edit is a password change too. The hash each user had at the last start is
    remembered (as a fingerprint) in the audit log, which every process shares; a new
    one ends that user's sessions everywhere. Returns the users whose hash changed.
    """
    changed: list[str] = []
    with Session(engine) as s, s.begin():
        for u in config_users:
            fp = _fingerprint(u.password_hash)
            last = s.scalar(
                select(AuditEntry.detail)
                .where(AuditEntry.action == CONFIG_PASSWORD_ACTION, AuditEntry.target == u.name)
                .order_by(AuditEntry.id.desc())
                .limit(1)
            )
            if last == fp:
                continue
            _end_sessions(s, u.name)
            _audit(s, None, CONFIG_PASSWORD_ACTION, u.name, "config", fp)
            if last is not None:
                changed.append(u.name)
    return changed


def _end_sessions(s: Session, name: str) -> int:
    result = s.execute(delete(WebSession).where(WebSession.user_name == name))
    return int(getattr(result, "rowcount", 0) or 0)


def _audit(
    s: Session, actor: str | None, action: str, target: str, client: str | None, detail: str | None
) -> None:
    s.add(
        AuditEntry(
            at=utcnow(),
            user_name=actor,
            action=action,
            target=target[:200],
            client=client,
            detail=detail,
        )
    )


class Users:
    """The user directory: config users first, then database users."""

    def __init__(self, engine: Engine, config_users: Sequence[WebUser]) -> None:
        self.engine = engine
        self.config_users = {u.name: u for u in config_users}
        self._config_checked = False

    def check_config_passwords(self) -> None:
        """Once per process (at start, or at first use if the database was down then)."""
        if self._config_checked:
            return
        changed = end_sessions_of_changed_config_users(
            self.engine, list(self.config_users.values())
        )
        self._config_checked = True
        for name in changed:
            log.info(
                "[web] users: the password of %s changed in the config; their sessions were ended",
                name,
            )

    def role_of(self, name: str) -> str | None:
        """The current role of an active user, None if the user is unknown or disabled."""
        if name in self.config_users:
            return self.config_users[name].role
        with Session(self.engine) as s:
            user = s.scalars(select(User).where(User.name == name)).one_or_none()
            return None if user is None or user.disabled else user.role

    def authenticate(self, name: str, password: str) -> Principal | None:
        self.check_config_passwords()
        cfg = self.config_users.get(name)
        if cfg is not None:
            return Principal(cfg.name, cfg.role) if _verify(cfg.password_hash, password) else None
        with Session(self.engine) as s, s.begin():
            user = s.scalars(select(User).where(User.name == name)).one_or_none()
            if user is None or user.disabled:
                _verify(_DUMMY_HASH, password)
                return None
            if not _verify(user.password_hash, password):
                return None
            if _hasher.check_needs_rehash(user.password_hash):
                user.password_hash = _hasher.hash(password)
            return Principal(user.name, user.role)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sessions:
    """Login sessions in the database, referenced by a signed cookie."""

    def __init__(
        self,
        engine: Engine,
        users: Users,
        secret_key: str,
        lifetime: timedelta = timedelta(hours=12),
    ) -> None:
        self.engine = engine
        self.users = users
        self.lifetime = lifetime
        self._signer = Signer(secret_key, salt="triaged.session")
        self._login = URLSafeTimedSerializer(secret_key, salt="triaged.login")

    def create(self, principal: Principal, client: str | None) -> tuple[str, str]:
        """Start a session; returns the cookie value and the session's CSRF token."""
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        now = utcnow()
        with Session(self.engine) as s, s.begin():
            s.execute(delete(WebSession).where(WebSession.expires_at < now))
            s.add(
                WebSession(
                    token_sha256=_digest(token),
                    user_name=principal.name,
                    role=principal.role,
                    csrf_token=csrf,
                    created_at=now,
                    expires_at=now + self.lifetime,
                    client=(client or "")[:64],
                )
            )
        return self._signer.sign(token).decode(), csrf

    def resolve(self, cookie: str | None) -> LoginSession | None:
        """The live session of a cookie; None if unsigned, unknown, expired or user gone."""
        if not cookie:
            return None
        try:
            token = self._signer.unsign(cookie).decode()
        except BadSignature:
            return None
        self.users.check_config_passwords()
        with Session(self.engine) as s:
            row = s.get(WebSession, _digest(token))
            if row is None or row.expires_at < utcnow():
                return None
            name, csrf = row.user_name, row.csrf_token
        role = self.users.role_of(name)
        if role is None:
            return None
        return LoginSession(Principal(name, role), csrf)

    def end(self, cookie: str | None) -> None:
        if not cookie:
            return
        try:
            token = self._signer.unsign(cookie).decode()
        except BadSignature:
            return
        with Session(self.engine) as s, s.begin():
            s.execute(delete(WebSession).where(WebSession.token_sha256 == _digest(token)))

    # Login form CSRF: there is no session yet, so the form token is a signed nonce that
    # must match the nonce in a short-lived SameSite=Strict cookie (signed double submit).
    def login_nonce(self) -> tuple[str, str]:
        """A (cookie value, form token) pair for the login form."""
        nonce = secrets.token_urlsafe(24)
        return nonce, self._login.dumps(nonce)

    def check_login_nonce(self, cookie: str | None, form_token: str, max_age: int = 3600) -> bool:
        if not cookie or not form_token:
            return False
        try:
            nonce = self._login.loads(form_token, max_age=max_age)
        except BadSignature:
            return False
        return isinstance(nonce, str) and hmac.compare_digest(nonce, cookie)


def same_token(expected: str, given: str | None) -> bool:
    """Constant-time comparison of a CSRF token."""
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())
