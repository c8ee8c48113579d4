"""Bearer JWT authentication (HS256, ``JWT_SECRET``; claims ``sub``, ``role``, ``exp``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import jwt

from escrow_stream.web.problems import Problem

ALGORITHM = "HS256"
LEEWAY_S = 5


class Role(StrEnum):
    USER = "user"
    ADMIN = "admin"
    SERVICE = "service"


@dataclass(frozen=True)
class Principal:
    sub: str
    role: Role


def authenticate(authorization: str | None, secret: str, now: datetime) -> Principal:
    """The principal of a ``Bearer`` header, or a 401 problem saying what is wrong."""
    if not authorization:
        raise Problem(
            401,
            "UNAUTHENTICATED",
            "an Authorization: Bearer token is required",
            headers={"WWW-Authenticate": "Bearer"},
        )
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Problem(
            401,
            "UNAUTHENTICATED",
            "the Authorization header must be 'Bearer <JWT>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        claims = jwt.decode(
            token.strip(),
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["sub", "role", "exp"], "verify_exp": False},
        )
    except jwt.PyJWTError as exc:
        raise Problem(
            401,
            "INVALID_TOKEN",
            f"invalid token: {exc}",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        ) from None
    exp = claims["exp"]
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise Problem(
            401,
            "INVALID_TOKEN",
            "the token's exp must be a number (seconds since the epoch)",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    # exp is checked against the injected clock, not the wall clock PyJWT would read
    if exp + LEEWAY_S < now.timestamp():
        raise Problem(
            401,
            "TOKEN_EXPIRED",
            "the token has expired",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    sub, role = claims["sub"], claims["role"]
    if not isinstance(sub, str) or not sub or not isinstance(role, str) or role not in set(Role):
        raise Problem(
            401,
            "INVALID_TOKEN",
            "the token needs a string sub and a role of user, admin or service",
        )
    return Principal(sub=sub, role=Role(role))


def issue_token(secret: str, sub: str, role: Role, now: datetime, ttl: timedelta) -> str:
    """A token for development and tests (the identity provider issues real ones)."""
    payload = {
        "sub": sub,
        "role": role.value,
        "iat": int(now.timestamp()),
        "exp": int((now + ttl).timestamp()),
    }
    return jwt.encode(payload, secret, algorithm=ALGORITHM)
