"""JWT verification and minting. Algorithms come from configuration, never from the token."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from common.config import ConfigError, Settings
from common.protocol import MAX_USER_ID

ROLES = frozenset({"admin", "agent", "service"})


class AuthError(Exception):
    """The token is missing, malformed, expired or not signed by us."""


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: str
    roles: frozenset[str]
    expires_at: float

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    @property
    def is_agent(self) -> bool:
        return "agent" in self.roles

    @property
    def is_service(self) -> bool:
        """A backend or bot: posts into any session as `assistant` or `system` (SPEC §6)."""
        return "service" in self.roles


class TokenVerifier:
    """Verifies bearer tokens with the one key and algorithm the deployment configured."""

    def __init__(self, settings: Settings) -> None:
        settings.require_jwt()
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._max_ttl = settings.jwt_max_ttl
        self._key: Any
        if settings.jwt_secret:
            self._key, self._algorithms = settings.jwt_secret, ["HS256"]
        else:
            assert settings.jwt_public_key is not None
            self._key, self._algorithms = _public_key(settings.jwt_public_key)

    def verify(self, token: str | None) -> Identity:
        """The identity in a valid token; AuthError otherwise."""
        if not token:
            raise AuthError("missing token")
        options: Any = {"require": ["exp", "sub"], "verify_aud": self._audience is not None}
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not 1 <= len(sub) <= MAX_USER_ID or "\x00" in sub:
            raise AuthError(
                "invalid token: 'sub' must be a string of 1 to 128 characters, without U+0000"
            )
        if not sub.isascii():
            try:
                sub.encode()
            except UnicodeEncodeError:  # a lone surrogate: not text
                raise AuthError("invalid token: 'sub' is not valid UTF-8 text") from None
        if self._max_ttl is not None:
            _check_lifetime(claims, self._max_ttl)
        roles = claims.get("roles", [])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise AuthError("invalid token: 'roles' must be a list of strings")
        return Identity(sub, frozenset(roles) & ROLES, float(claims["exp"]))


def _check_lifetime(claims: dict[str, Any], max_ttl: int) -> None:
    """FANOUT_JWT_MAX_TTL: a token may not live longer, counted from now or from `iat`."""
    exp = float(claims["exp"])  # checked a number by PyJWT
    if exp - time.time() > max_ttl:
        raise AuthError(f"invalid token: it expires more than {max_ttl} s from now")
    iat = claims.get("iat")
    if isinstance(iat, int | float) and not isinstance(iat, bool) and exp - iat > max_ttl:
        raise AuthError(f"invalid token: its lifetime (exp - iat) is over {max_ttl} s")


def _public_key(pem: str) -> tuple[Any, list[str]]:
    try:
        key = load_pem_public_key(pem.replace("\\n", "\n").encode())
    except ValueError:
        raise ConfigError("FANOUT_JWT_PUBLIC_KEY is not a PEM public key") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, ["RS256"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key, ["ES256"]
    raise ConfigError("FANOUT_JWT_PUBLIC_KEY must be an RSA or EC (P-256) public key")


def mint_token(
    secret: str,
    user_id: str,
    *,
    roles: list[str] | None = None,
    ttl: float = 3600,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """An HS256 token for local use (`fanout token`, tests, the load generator)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + int(ttl)}
    if roles:
        claims["roles"] = roles
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")
