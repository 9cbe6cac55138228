"""Who is calling: the bearer token checked once a request, the caller's rate limit, and the token settings."""

import math
import os
import secrets
import time

import jwt
from flask import current_app, g, request
from flask_jwt_extended import JWTManager, verify_jwt_in_request
from flask_jwt_extended.exceptions import JWTExtendedException, NoAuthorizationError

import logs
from errors import ApiError, Unauthorized

MIN_SECRET_BYTES = 32
VERIFIED_TOKENS_KEPT = 10000


def init_app(app):
    """Set up HS256 JWTs, refusing a weak secret in production."""
    secret = app.config["JWT_SECRET_KEY"]
    if not secret and app.config["APP_ENV"] == "development":
        secret = local_secret(app.instance_path)
    if not secret or len(secret.encode()) < MIN_SECRET_BYTES:
        raise RuntimeError(f"JWT_SECRET_KEY must be set to at least {MIN_SECRET_BYTES} bytes "
                           "(or APP_ENV=development to generate a local one)")
    app.config.update(JWT_SECRET_KEY=secret, JWT_ALGORITHM="HS256",
                      JWT_DECODE_ALGORITHMS=["HS256"], JWT_TOKEN_LOCATION=["headers"])
    JWTManager(app)
    app.extensions["verified_tokens"] = VerifiedTokens()


def local_secret(instance_path):
    """A secret generated once and kept in the instance folder, for local development."""
    path = os.path.join(instance_path, "jwt-secret")
    if not os.path.exists(path):
        os.makedirs(instance_path, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(48))
    with open(path) as kept:
        return kept.read().strip()


def authenticate():
    """Before a request that needs a user: check the bearer token, note the user, count the request.

    Sets `g.user`. Runs once a request (a `before_request` of the blueprints that need a user).
    """
    header = request.headers.get("Authorization", "")
    tokens = current_app.extensions["verified_tokens"]
    kept = tokens.claims_of(header)
    if kept is None:
        kept = verified_claims()
        tokens.remember(header, *kept)
    else:
        restore_jwt_context(*kept)
    g.user = kept[1]["sub"]
    note(user=g.user)
    limit_rate(g.user)


def verified_claims():
    """The header and claims of the request's bearer token, as flask-jwt-extended checks it; 401 if bad."""
    try:
        header, claims = verify_jwt_in_request()
    except NoAuthorizationError:
        raise Unauthorized(message="send a bearer token: Authorization: Bearer <token>") from None
    except jwt.ExpiredSignatureError:
        raise Unauthorized(message="the token has expired") from None
    except (JWTExtendedException, jwt.PyJWTError):
        raise Unauthorized() from None
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise Unauthorized(message="the token has no subject")
    return header, claims


def restore_jwt_context(header, claims):
    """Give flask-jwt-extended the request context its own check would have left (get_jwt() works)."""
    g._jwt_extended_jwt_header = header
    g._jwt_extended_jwt = claims
    g._jwt_extended_jwt_user = {"loaded_user": None}
    g._jwt_extended_jwt_location = "headers"


class VerifiedTokens:
    """Authorization headers whose token was verified, with its header and claims.

    A client sends the same token with every request; checking its signature and claims
    again was about 6% of a turn's CPU. Only a token that passed every check is kept,
    and it is refused again from the moment it expires. The oldest are forgotten first.
    """

    def __init__(self, size=VERIFIED_TOKENS_KEPT):
        """None kept yet; at most `size`."""
        self.size = size
        self._kept = {}

    def claims_of(self, header):
        """The (token header, claims) of an already verified header that has not expired since, else None."""
        kept = self._kept.get(header)
        if kept is None:
            return None
        expires, token_header, claims = kept
        if expires <= time.time():
            self._kept.pop(header, None)
            return None
        return token_header, claims

    def remember(self, header, token_header, claims):
        """Keep a verified header's token until its `exp` (none: for ever)."""
        if len(self._kept) >= self.size:
            self._kept.pop(next(iter(self._kept)), None)
        expires = claims.get("exp")
        self._kept[header] = (math.inf if expires is None else expires, token_header, claims)


def note(**fields):
    """Add fields to this request's log line."""
    request.environ.setdefault(logs.RECORD_KEY, {}).update(fields)


def limit_rate(user):
    """429 once `user` has made RATE_LIMIT_PER_MINUTE requests this minute (off when 0)."""
    limit = current_app.config["RATE_LIMIT_PER_MINUTE"]
    if limit and current_app.extensions["coordination"].count_request(user, 60) > limit:
        retry_after = str(60 - int(time.time()) % 60)
        raise ApiError(429, "rate_limited", f"at most {limit} requests a minute",
                       {"Retry-After": retry_after})
