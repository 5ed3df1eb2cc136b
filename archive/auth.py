"""Operator accounts, roles and authentication.

An install made with ``pacsvault init --admin NAME`` has accounts: from then on
every verb that touches data needs an operator, who is named in the audit
trail. A script gives ``PACSVAULT_USER`` / ``PACSVAULT_PASSWORD``; a person may
``pacsvault login`` instead (a session token with an expiry, kept in a 0600
file in their home, only its SHA-256 in the catalog). An install without
accounts trusts whoever can read its config (as restic trusts whoever holds
its password), and the audit trail names the OS user.

Passwords: argon2id; the policy of [accounts] (length, character classes, a
deny-list of common passwords, not the user name, not one of the last N);
a password someone else set must be changed at first use; passwords expire;
repeated failures lock the account with a back-off that doubles. A refused
log-in reads the same (and takes as long) for an unknown, a locked, a disabled
account and a wrong password: it names no account.
"""
from __future__ import annotations

import getpass
import hashlib
import os
import secrets
import string
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, func, select

from archive import audit
from archive.catalog.models import LoginSession, PasswordHistory, User
from archive.catalog.uow import Catalog
from archive.clock import Clock, utcnow
from archive.config.schema import AccountSettings
from archive.errors import PacsvaultError

ROLES: dict[str, frozenset[str]] = {
    # least privilege: what each role may do (permissions named by the verbs below)
    "viewer": frozenset({"read"}),
    "operator": frozenset({"read", "operate", "find", "view", "store"}),
    "key-custodian": frozenset({"read", "keys", "restore", "find", "view"}),
    "auditor": frozenset({"read", "audit"}),
    "admin": frozenset({"read", "operate", "keys", "restore", "audit", "admin", "find", "view",
                        "store"}),
}
PERMISSIONS = {
    "read": "status, jobs, dr volumes/rotation, drill --history, peer list",
    "operate": "scrub, migrate, recall, replicate, dr write/custody/manifest",
    "keys": "dr verify, dr rebuild-catalog (use of a DR identity)",
    "restore": "restore, drill",
    "find": "find (names patients and where their studies are)",
    "view": "DICOMweb QIDO-RS and WADO-RS (search and read images over HTTP)",
    "store": "DICOMweb STOW-RS (store images over HTTP)",
    "audit": "audit",
    "admin": "user add/passwd/disable/enable/role, peer add/remove",
}
_hasher = PasswordHasher()          # argon2id, the library's current recommended parameters
current_actor: ContextVar[str] = ContextVar("current_actor", default="")
COMMON = frozenset((Path(__file__).with_name("common_passwords.txt")).read_text().split())


class AuthError(PacsvaultError):
    """not allowed: {}"""

    exit_code = 13


@dataclass
class Actor:
    name: str
    role: str
    accounts: bool               # False: an install without accounts (OS user, all rights)

    def can(self, permission: str) -> bool:
        return not self.accounts or permission in ROLES[self.role]


# -- passwords ---------------------------------------------------------------------------
def policy_problems(password: str, user: str, policy: AccountSettings) -> list[str]:
    out = []
    if len(password) < policy.min_length:
        out.append(f"shorter than {policy.min_length} characters")
    if len(password) > 1024:
        out.append("longer than 1024 characters")
    classes = sum(any(c in cls for c in password) for cls in (
        string.ascii_lowercase, string.ascii_uppercase, string.digits))
    classes += any(not c.isalnum() for c in password)
    if classes < policy.min_classes:
        out.append(f"uses {classes} of the 4 character classes (lower, upper, digit, other); "
                   f"{policy.min_classes} needed")
    low = password.lower()
    if low in COMMON or any(low.startswith(w) and low[len(w):].isdigit() for w in COMMON
                            if len(w) >= 6):
        out.append("is a commonly used password")
    if user and user.lower() in low:
        out.append("contains the user name")
    return out


def _check_policy(password: str, user: str, policy: AccountSettings) -> None:
    problems = policy_problems(password, user, policy)
    if problems:
        raise AuthError("password refused: " + "; ".join(problems))


def _reused(s, user: User, password: str, keep: int) -> bool:  # noqa: ANN001
    old = [user.password_hash] + list(s.scalars(
        select(PasswordHistory.password_hash).where(PasswordHistory.user_fk == user.id)
        .order_by(PasswordHistory.id.desc()).limit(keep)))
    for h in old[:keep]:
        try:
            if _hasher.verify(h, password):
                return True
        except (VerificationError, InvalidHashError):
            continue
    return False


def create_user(catalog: Catalog, name: str, role: str, password: str, policy: AccountSettings,
                *, must_change: bool, clock: Clock = utcnow) -> None:
    _valid_name(name)
    if role not in ROLES:
        raise AuthError(f"no role {role!r} (roles: {', '.join(ROLES)})")
    _check_policy(password, name, policy)
    now = clock()
    with catalog.unit(write=True) as uow:
        if uow.session.scalar(select(User.id).where(User.name == name)):
            raise AuthError(f"user {name} exists")
        uow.session.add(User(name=name, role=role, password_hash=_hasher.hash(password),
                             must_change=must_change, disabled=False, failed_logins=0,
                             password_set_at=now, created_at=now))
        uow.commit()


def set_password(catalog: Catalog, name: str, password: str, policy: AccountSettings, *,
                 by_admin: bool, clock: Clock = utcnow) -> None:
    """A new password: the policy, no reuse of the last N. Set by an admin for
    someone else, it must be changed at first use."""
    _check_policy(password, name, policy)
    with catalog.unit(write=True) as uow:
        s = uow.session
        u = s.scalars(select(User).where(User.name == name)).first()
        if u is None:
            raise AuthError(f"no user {name}")
        if _reused(s, u, password, policy.history):
            raise AuthError(f"password refused: one of the last {policy.history} passwords")
        s.add(PasswordHistory(user_fk=u.id, password_hash=u.password_hash, set_at=u.password_set_at))
        u.password_hash = _hasher.hash(password)
        u.password_set_at = clock()
        u.must_change = by_admin
        u.failed_logins, u.locked_until = 0, None
        if by_admin:   # a reset ends the person's sessions
            s.execute(delete(LoginSession).where(LoginSession.user_fk == u.id))
        uow.commit()


def _valid_name(name: str) -> None:
    if not (1 <= len(name) <= 64) or not all(c.isalnum() or c in "._-@" for c in name):
        raise AuthError("a user name is 1-64 letters, digits and . _ - @")


def has_accounts(catalog: Catalog) -> bool:
    with catalog.unit() as uow:
        return bool(uow.session.scalar(select(func.count()).select_from(User)))


# -- authentication -------------------------------------------------------------------------
REFUSED = ("unknown user or wrong password, or the account is locked after repeated failed "
           "log-ins or disabled (an administrator sees which: pacsvault user list)")


def check_password(catalog: Catalog, name: str, password: str, policy: AccountSettings, *,
                   source: str, count_failures: bool = True, clock: Clock = utcnow) -> User:
    """The user if the password is right and the account usable; failures audited
    (without the password, of course). Every refusal reads the same and costs one
    password check, whether the user is unknown, locked, disabled or mistyped, so a
    caller cannot learn which accounts exist. ``count_failures``: a wrong password
    counts towards the account's lock (back-off that doubles); the HTTP endpoint
    throttles per source instead (archive/daemon/throttle.py), so that no local process
    can lock an operator out."""
    now = clock()
    with catalog.unit(write=True) as uow:
        s = uow.session
        u = s.scalars(select(User).where(User.name == name)).first()
        why = None
        right = _password_matches(u.password_hash if u is not None else None, password)
        if u is None:
            why = "unknown user"
        elif u.disabled:
            why = "disabled"
        elif u.locked_until is not None and _aware(u.locked_until, now) > now:
            why = "locked"
        elif not right:
            why = "wrong password"
            if count_failures:
                u.failed_logins += 1
                if u.failed_logins >= policy.lockout_after:
                    extra = u.failed_logins - policy.lockout_after
                    secs = min(policy.lockout_base_s * 2 ** extra, policy.lockout_max_s)
                    u.locked_until = now + timedelta(seconds=secs)
        if why is not None:
            uow.commit()
            audit.record_quietly(catalog, audit.Event("login-failed", "failure", name[:64], source,
                                                      detail={"why": why}))
            raise AuthError(REFUSED)
        u.failed_logins, u.locked_until, u.last_login_at = 0, None, now
        if _hasher.check_needs_rehash(u.password_hash):
            u.password_hash = _hasher.hash(password)
        uow.commit()
        s.expunge(u)
        return u


def _password_matches(stored: str | None, password: str) -> bool:
    """One argon2 computation whatever ``stored`` is (None: an unknown user)."""
    if stored is None:
        _hasher.hash(password)             # the same cost as a real check
        return False
    try:
        return _hasher.verify(stored, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _aware(t, now):  # noqa: ANN001, ANN202
    return t if t.tzinfo is not None else t.replace(tzinfo=now.tzinfo)


def expired(u: User, policy: AccountSettings, now) -> bool:  # noqa: ANN001
    return policy.max_age_days > 0 and _aware(u.password_set_at, now) + timedelta(
        days=policy.max_age_days) < now


def session_file(config_path: Path | None) -> Path:
    key = hashlib.sha256(str(config_path or "").encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "pacsvault" / f"session-{key}"


def login(catalog: Catalog, name: str, password: str, policy: AccountSettings,
          config_path: Path | None, clock: Clock = utcnow) -> Path:
    u = check_password(catalog, name, password, policy, source=audit.host(), clock=clock)
    token = secrets.token_urlsafe(32)
    now = clock()
    with catalog.unit(write=True) as uow:
        uow.session.add(LoginSession(user_fk=u.id, token_sha256=hashlib.sha256(token.encode())
                                     .hexdigest(), created_at=now,
                                     expires_at=now + timedelta(hours=policy.session_hours)))
        uow.commit()
    path = session_file(config_path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{name}\n{token}\n")
    audit.record_quietly(catalog, audit.Event("login", actor=name, source=audit.host(),
                                              detail={"session_hours": policy.session_hours}))
    return path


def _from_session(catalog: Catalog, config_path: Path | None, now) -> User | None:  # noqa: ANN001
    path = session_file(config_path)
    try:
        name, token = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256(token.encode()).hexdigest()
    with catalog.unit() as uow:
        row = uow.session.execute(select(User, LoginSession.expires_at)
                                  .join(LoginSession, LoginSession.user_fk == User.id)
                                  .where(LoginSession.token_sha256 == digest,
                                         User.name == name)).first()
        if row is None or _aware(row[1], now) <= now or row[0].disabled:
            return None
        uow.session.expunge(row[0])
        return row[0]


def authenticate(catalog: Catalog, policy: AccountSettings, config_path: Path | None, *,
                 allow_must_change: bool = False, clock: Clock = utcnow) -> Actor:
    """Who runs this verb: from the environment, else a login session, else (no
    accounts on this install) the OS user."""
    if not has_accounts(catalog):
        return Actor(getpass.getuser(), "admin", accounts=False)
    now = clock()
    name, password = os.environ.get("PACSVAULT_USER"), os.environ.get("PACSVAULT_PASSWORD")
    if name and password is not None:
        u = check_password(catalog, name, password, policy, source=audit.host(), clock=clock)
    else:
        u = _from_session(catalog, config_path, now)
        if u is None:
            raise AuthError("this install has operator accounts: set PACSVAULT_USER and "
                            "PACSVAULT_PASSWORD, or run 'pacsvault login'")
    if not allow_must_change and (u.must_change or expired(u, policy, now)):
        raise AuthError(f"the password of {u.name} must be changed first "
                        f"({'set by an administrator' if u.must_change else 'expired'}): "
                        "run 'pacsvault user passwd'")
    return Actor(u.name, u.role, accounts=True)


def require(actor: Actor, permission: str, verb: str) -> None:
    if not actor.can(permission):
        raise AuthError(f"{actor.name} ({actor.role}) may not run {verb}: it needs the "
                        f"'{permission}' permission ({', '.join(r for r, p in ROLES.items() if permission in p)})")
