"""Who is calling: the bearer token checked once a request, the caller's rate limit, and the token settings."""

import math
import os
import re
import secrets
import time

import jwt
from flask import current_app, g, request
from flask_jwt_extended import JWTManager, verify_jwt_in_request
from flask_jwt_extended.exceptions import JWTExtendedException, NoAuthorizationError

import logs
import token_keys
from errors import RateLimited, Unauthorized

VERIFIED_TOKENS_KEPT = 10000
# The characters of the memory the verified tokens may hold (tokens and what they carry).
VERIFIED_TOKENS_CHARS = 4_000_000
# RFC 6750's b64token; a JWT is three base64url parts joined by dots.
BEARER = re.compile(r"Bearer ([A-Za-z0-9._~+/-]+=*)")
USER_CHARS = 255
# The last second of the year 9999: an `exp` past it is no time a clock reaches (10**309 is no float at all).
LATEST_EXPIRY = 253402300799
RATE_WINDOW = 60
# Any of these set, the service has keys of its own; none set in development, it generates a secret.
KEY_SETTINGS = ("JWT_SECRET_KEY", "JWT_PUBLIC_KEY", "JWT_JWKS_URL")
# What a client is told for a token refused for one of these reasons (else "the token is not valid").
REFUSALS = ((jwt.ExpiredSignatureError, "the token has expired"),
            (jwt.InvalidAudienceError, "the token is meant for another audience (aud)"),
            (jwt.InvalidIssuerError, "the token comes from another issuer (iss)"),
            (jwt.PyJWKClientError, "the token's key (kid) is not one the identity provider lists"))


def init_app(app):
    """Set up bearer tokens: HS256 with the service's secret and/or the identity provider's; refuse a weak setup."""
    config = app.config
    if config["APP_ENV"] == "development" and not any(config[name] for name in KEY_SETTINGS):
        config["JWT_SECRET_KEY"] = local_secret(app.instance_path)
    keys = token_keys.from_config(config)
    audience = audiences(config["JWT_AUDIENCE"])
    # flask-jwt-extended adds JWT_ALGORITHM (what create-token signs with) to the algorithms it
    # accepts, so without HS256 it must be one of the accepted ones.
    signing = token_keys.SECRET_ALGORITHM if keys.can_sign() else keys.algorithms[0]
    config.update(JWT_ALGORITHM=signing, JWT_DECODE_ALGORITHMS=list(keys.algorithms),
                  JWT_TOKEN_LOCATION=["headers"],
                  JWT_IDENTITY_CLAIM=config["JWT_USER_CLAIM"],
                  JWT_DECODE_AUDIENCE=audience, JWT_ENCODE_AUDIENCE=audience,
                  JWT_DECODE_ISSUER=config["JWT_ISSUER"], JWT_ENCODE_ISSUER=config["JWT_ISSUER"])
    JWTManager(app).decode_key_loader(decode_key)
    app.extensions["token_keys"] = keys
    app.extensions["verified_tokens"] = VerifiedTokens()


def audiences(setting):
    """JWT_AUDIENCE as PyJWT takes it: None, one audience, or a list (comma-separated; any one will do)."""
    named = [name.strip() for name in (setting or "").split(",") if name.strip()]
    return None if not named else named[0] if len(named) == 1 else named


def decode_key(header, claims):
    """The key for the token being checked, by its `alg` among those configured (the decode_key_loader).

    flask-jwt-extended's own choice (JWT_SECRET_KEY or JWT_PUBLIC_KEY, by JWT_ALGORITHM) is one
    key for every token, so it could not take the service's HS256 tokens beside the provider's.
    """
    previous = g.get("trying_previous_secret", False)
    return current_app.extensions["token_keys"].key_for(header, previous=previous)


def can_sign():
    """Whether `create-token` can mint tokens this service accepts (it needs JWT_SECRET_KEY and HS256)."""
    return current_app.extensions["token_keys"].can_sign()


def local_secret(instance_path):
    """A secret generated once and kept in the instance folder, for local development."""
    path = os.path.join(instance_path, "jwt-secret")
    if not os.path.exists(path):
        os.makedirs(instance_path, exist_ok=True)
        # Written whole under another name, then linked into place: two workers starting at once
        # never read a half-written secret, and the first link wins.
        draft = f"{path}.{os.getpid()}"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(48))
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            os.remove(draft)
    with open(path) as kept:
        return kept.read().strip()


def authenticate():
    """Before a request that needs a user: check the bearer token, note the user, count the request.

    Sets `g.user`. Runs once a request (a `before_request` of the blueprints that need a user).
    """
    g.user = user_of_request()
    note(user=g.user)
    limit_rate(g.user)


def user_of_request():
    """The user the request's bearer token names; 401 for any problem with the token.

    Only `Authorization: Bearer <token>` is accepted, exactly: no other scheme, no list.
    """
    found = BEARER.fullmatch(request.headers.get("Authorization", ""))
    if found is None:
        raise Unauthorized(message="send a bearer token: Authorization: Bearer <token>")
    token = found.group(1)
    tokens = current_app.extensions["verified_tokens"]
    kept = tokens.claims_of(token)
    if kept is None:
        kept = verified_claims(token)
        tokens.remember(token, *kept)
    else:
        restore_jwt_context(*kept)
    return kept[1][current_app.config["JWT_USER_CLAIM"]]


def optional_user():
    """The user of a valid bearer token, or None (without one, or with a bad one)."""
    try:
        return user_of_request()
    except Unauthorized:
        return None


def verified_claims(token):
    """The header and claims of the request's bearer token, once every check passed; 401 if one fails."""
    try:
        checked = checked_token(token)
    except NoAuthorizationError:
        raise Unauthorized(message="send a bearer token: Authorization: Bearer <token>") from None
    except (JWTExtendedException, jwt.PyJWTError) as exc:
        raise Unauthorized(message=refusal(exc)) from None
    if checked is None:  # flask-jwt-extended checks nothing on OPTIONS (hard-coded): vouch for nothing
        raise Unauthorized()
    header, claims = checked
    claim = current_app.config["JWT_USER_CLAIM"]
    if not usable_user(claims.get(claim)):
        raise Unauthorized(message=f"the token's user ({claim}) must be 1 to {USER_CHARS} characters of text")
    if not usable_expiry(claims.get("exp")):
        raise Unauthorized(message="the token's expiry (exp) must be a time before the year 10000")
    return header, claims


def checked_token(token):
    """flask-jwt-extended's check of the request's token; during a secret rotation, again with the previous secret.

    Its decode_key_loader gives one key a token and PyJWT verifies with that key alone, so an
    HS256 token the current secret does not verify is checked a second time with the loader
    pointed at JWT_SECRET_KEY_PREVIOUS.
    """
    try:
        return verify_jwt_in_request()
    except jwt.InvalidSignatureError:
        if not current_app.extensions["token_keys"].rotating(token):
            raise
    g.trying_previous_secret = True
    try:
        return verify_jwt_in_request()
    finally:
        g.trying_previous_secret = False


def refusal(exc):
    """What a client is told about a token refused with `exc`."""
    return next((message for kind, message in REFUSALS if isinstance(exc, kind)), Unauthorized.message)


def usable_user(user):
    """Whether a token's user claim can name a user: text the database can keep, not too long."""
    if not isinstance(user, str) or not user or len(user) > USER_CHARS or "\x00" in user:
        return False
    try:
        user.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def usable_expiry(expires):
    """Whether a token's `exp` (None: it has none) is a time a clock can reach; PyJWT took it as a whole number."""
    return expires is None or int(expires) <= LATEST_EXPIRY


def restore_jwt_context(header, claims):
    """Give flask-jwt-extended the request context its own check would have left (get_jwt() works)."""
    g._jwt_extended_jwt_header = header
    g._jwt_extended_jwt = claims
    g._jwt_extended_jwt_user = {"loaded_user": None}
    g._jwt_extended_jwt_location = "headers"


class VerifiedTokens:
    """Bearer tokens that were verified, with their header and claims.

    A client sends the same token with every request; checking its signature and claims
    again was about 6% of a turn's CPU. Only a token that passed every check is kept, and
    it is refused again from the moment it expires. At most `size` tokens and about
    `chars` characters are kept; the oldest are forgotten first.
    """

    def __init__(self, size=VERIFIED_TOKENS_KEPT, chars=VERIFIED_TOKENS_CHARS):
        """None kept yet."""
        self.size = size
        self.chars = chars
        self._kept = {}
        self._held = 0

    def claims_of(self, token):
        """The (token header, claims) of an already verified token that has not expired since, else None."""
        kept = self._kept.get(token)
        if kept is None:
            return None
        expires, token_header, claims = kept
        if expires <= time.time():
            self._forget(token)
            return None
        return token_header, claims

    def remember(self, token, token_header, claims):
        """Keep a verified token until its `exp` (none: for ever)."""
        # The claims were checked, so `exp` is a whole number (or a string of one, which PyJWT takes)
        # of a time before the year 10000.
        expires = math.inf if claims.get("exp") is None else float(claims["exp"])
        weight = self._weight(token)
        while self._kept and (len(self._kept) >= self.size or self._held + weight > self.chars):
            self._forget(next(iter(self._kept)))
        if weight <= self.chars:
            self._kept[token] = (expires, token_header, claims)
            self._held += weight

    def _forget(self, token):
        """Stop keeping a token."""
        if self._kept.pop(token, None) is not None:
            self._held -= self._weight(token)

    @staticmethod
    def _weight(token):
        """The characters a kept token costs: itself and about as much again for its claims."""
        return 2 * len(token)


def note(**fields):
    """Add fields to this request's log line."""
    request.environ.setdefault(logs.RECORD_KEY, {}).update(fields)


def limit_rate(user):
    """429 once `user` has made more than RATE_LIMIT_PER_MINUTE requests in the last minute (off when 0)."""
    limit = current_app.config["RATE_LIMIT_PER_MINUTE"]
    if not limit:
        return
    now = time.time()
    previous, current = current_app.extensions["coordination"].count_request(user, RATE_WINDOW, now)
    elapsed = now % RATE_WINDOW
    if sliding_count(previous, current, elapsed, RATE_WINDOW) > limit:
        wait = seconds_until_room(previous, current, elapsed, RATE_WINDOW, limit)
        raise RateLimited(limit, wait)


def sliding_count(previous, current, elapsed, window):
    """The requests of the last `window` seconds, estimated from the counts of two fixed windows.

    The previous window's requests are taken as spread evenly over it, so the part of it still
    inside the last `window` seconds counts in proportion (Cloudflare's sliding window counter).
    """
    return previous * (window - elapsed) / window + current


def seconds_until_room(previous, current, elapsed, window, limit):
    """Whole seconds until one more request would be within `limit`, if no other comes meanwhile."""
    if current < limit and previous:
        # Within this window: wait until enough of the previous one has slid out.
        wait = window - elapsed - (limit - current) * window / previous
    else:
        # Next window: this one's `current` requests become the previous ones, sliding out.
        wait = window - elapsed + window - (limit - 1) * window / max(current, 1)
    return max(1, math.ceil(wait))
