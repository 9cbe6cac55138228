"""Which key verifies a token: the service's HS256 secrets, a PEM public key, or the identity provider's JWKS."""

import contextlib
import logging
import math
import threading
import time

import gevent
import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from gevent import monkey
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from config import VERSION, ConfigError

log = logging.getLogger("token_keys")

MIN_SECRET_BYTES = 32
SECRET_ALGORITHM = "HS256"
# The public-key algorithms an operator may name in JWT_ALGORITHMS (never "none", never another HMAC).
PUBLIC_KEY_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                         "ES256", "ES384", "ES512", "EdDSA")
DEFAULT_PUBLIC_KEY_ALGORITHMS = ("RS256", "ES256")
# An unknown kid (or keys gone stale) fetches the JWKS at most this often, per process.
REFETCH_SECONDS = 60
# Keys this old are fetched again, so a key the provider withdrew stops being accepted.
KEYS_FRESH_SECONDS = 300


class TokenKeys:
    """The algorithms accepted and the key for each token: a token's `alg` only chooses among them."""

    def __init__(self, algorithms, secrets=(), public_key=None, provider=None):
        """Accept `algorithms` only; HS256 with `secrets` (current first), the others with one PyJWK or a provider."""
        self.algorithms = list(algorithms)
        self.secrets = list(secrets)
        self.public_key = public_key
        self.provider = provider

    def key_for(self, header, previous=False):
        """The key that verifies a token with this header (the previous secret if asked); a PyJWTError if none."""
        algorithm = header.get("alg")
        if algorithm not in self.algorithms:
            raise jwt.InvalidAlgorithmError("the token's algorithm is not accepted")
        if algorithm == SECRET_ALGORITHM:
            return self.secrets[1] if previous else self.secrets[0]
        if self.public_key is not None:
            return self.public_key
        return self.provider.key(header.get("kid"))

    def rotating(self, token):
        """Whether an HS256 token that the current secret did not verify should be tried with the previous one."""
        return len(self.secrets) > 1 and jwt.get_unverified_header(token).get("alg") == SECRET_ALGORITHM

    def can_sign(self):
        """Whether this service can mint tokens it accepts (HS256 with its own secret)."""
        return SECRET_ALGORITHM in self.algorithms


class ProviderKeys:
    """The identity provider's signing keys, fetched from its JWKS endpoint by PyJWKClient and kept by kid.

    PyJWKClient's own cache drops every key when its copy expires and the endpoint is down, and
    its cooldown counts only successful fetches (an outage would make every unknown kid wait on
    one), so the keeping is done here: a fetch is tried at most once every REFETCH_SECONDS,
    failed or not, for an unknown kid or keys older than KEYS_FRESH_SECONDS; a failed fetch
    keeps the keys from before; each fetch is bounded by `timeout`.
    """

    def __init__(self, url, timeout, clock=time.monotonic):
        """No keys yet: the first token that needs one fetches them (the service starts with the provider down)."""
        self.url = url
        self.timeout = timeout
        self.clock = clock
        self.client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=timeout,
                                      headers={"User-Agent": f"chat-api/{VERSION}"})
        self.keys = {}
        self.fetched = -math.inf
        self.tried = -math.inf
        self.lock = threading.Lock()

    def key(self, kid):
        """The provider's signing key named `kid`; PyJWKClientError if it has none that we know of."""
        if not isinstance(kid, str):
            raise jwt.PyJWKClientError("the token names no key (kid)")
        if kid not in self.keys or self.clock() - self.fetched > KEYS_FRESH_SECONDS:
            self.refresh()
        try:
            return self.keys[kid]
        except KeyError:
            raise jwt.PyJWKClientError("the identity provider has no such key") from None

    def refresh(self):
        """Fetch the keys, unless a fetch was tried within REFETCH_SECONDS; keep the ones held if it fails."""
        if not self.lock.acquire(timeout=self.timeout):
            return  # another request's fetch is taking its time: go on with the keys held
        try:
            if self.clock() - self.tried < REFETCH_SECONDS:
                return
            self.tried = self.clock()
            self.keys = self.fetch()
            self.fetched = self.clock()
        except (jwt.PyJWTError, OSError, ValueError) as exc:
            log.warning("cannot fetch the identity provider's keys from %s (keeping %d): %s",
                        self.url, len(self.keys), exc)
        finally:
            self.lock.release()

    def fetch(self):
        """The provider's public signing keys by kid, fetched now."""
        with whole_wait_bounded(self.timeout):
            found = self.client.get_signing_keys(refresh=True)
        return {key.key_id: key for key in found if key.algorithm_name in PUBLIC_KEY_ALGORITHMS}


def whole_wait_bounded(seconds):
    """Under gevent, a bound on the whole of a fetch (name lookup and a slow trickle included).

    PyJWKClient's own timeout bounds each socket wait alone. Without gevent (the Flask dev
    server, the tests' client) that is the only bound.
    """
    if monkey.is_module_patched("socket"):
        return gevent.Timeout(seconds, TimeoutError(f"no JWKS within {seconds} s"))
    return contextlib.nullcontext()


def from_config(config):
    """The TokenKeys the settings describe; ConfigError for settings the service cannot start with."""
    secrets = configured_secrets(config)
    public_key = configured_public_key(config)
    provider = configured_provider(config)
    if public_key is not None and provider is not None:
        raise ConfigError("set JWT_PUBLIC_KEY or JWT_JWKS_URL, not both")
    if not secrets and public_key is None and provider is None:
        raise ConfigError(f"JWT_SECRET_KEY must be set to at least {MIN_SECRET_BYTES} bytes "
                          "(or JWT_JWKS_URL or JWT_PUBLIC_KEY for your identity provider's tokens, "
                          "or APP_ENV=development to generate a local secret)")
    algorithms = accepted_algorithms(config, secrets, public_key, provider)
    return TokenKeys(algorithms, secrets, public_key, provider)


def configured_secrets(config):
    """The HS256 secrets, current first then previous: none, one, or two (during a rotation)."""
    current, previous = config["JWT_SECRET_KEY"], config["JWT_SECRET_KEY_PREVIOUS"]
    if previous and not current:
        raise ConfigError("JWT_SECRET_KEY_PREVIOUS needs JWT_SECRET_KEY (the secret that replaces it)")
    for name, secret in (("JWT_SECRET_KEY", current), ("JWT_SECRET_KEY_PREVIOUS", previous)):
        if secret is not None and len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"{name} must be set to at least {MIN_SECRET_BYTES} bytes")
    return [secret for secret in (current, previous) if secret]


def configured_public_key(config):
    """JWT_PUBLIC_KEY as a PyJWK (its algorithm bound by its type: RSA is RS256, P-256 is ES256), or None."""
    pem = config["JWT_PUBLIC_KEY"]
    if not pem:
        return None
    if "\\n" in pem and "\n" not in pem:  # a PEM kept on one line, as some platforms' settings need
        pem = pem.replace("\\n", "\n")
    try:
        key = load_pem_public_key(pem.strip().encode())
        return jwt.PyJWK(public_key_jwk(key))
    except (ValueError, TypeError, jwt.PyJWTError):
        raise ConfigError("JWT_PUBLIC_KEY must be a PEM public key (-----BEGIN PUBLIC KEY-----): "
                          "RSA, EC (P-256, P-384, P-521) or Ed25519") from None


def public_key_jwk(key):
    """A public key of `cryptography` as a JWK dict; TypeError for a kind JWTs are not signed with."""
    for key_type, kind in ((RSAPublicKey, RSAAlgorithm), (EllipticCurvePublicKey, ECAlgorithm),
                           (Ed25519PublicKey, OKPAlgorithm)):
        if isinstance(key, key_type):
            return kind.to_jwk(key, as_dict=True)
    raise TypeError("not a key JWTs are signed with")


def configured_provider(config):
    """The identity provider's keys at JWT_JWKS_URL, or None."""
    url = config["JWT_JWKS_URL"]
    if not url:
        return None
    timeout = config["JWT_JWKS_TIMEOUT_SECONDS"]
    if not 0 < timeout <= 60:
        raise ConfigError("JWT_JWKS_TIMEOUT_SECONDS must be more than 0 and at most 60")
    try:
        return ProviderKeys(url, timeout)
    except jwt.PyJWKClientError:
        raise ConfigError("JWT_JWKS_URL must be an http:// or https:// URL") from None


def accepted_algorithms(config, secrets, public_key, provider):
    """The algorithms tokens may use: JWT_ALGORITHMS if set (among those the keys allow), else the usual ones."""
    usual, possible = ([SECRET_ALGORITHM] if secrets else []), ([SECRET_ALGORITHM] if secrets else [])
    if public_key is not None:
        usual, possible = usual + [public_key.algorithm_name], possible + [public_key.algorithm_name]
    if provider is not None:
        usual, possible = usual + list(DEFAULT_PUBLIC_KEY_ALGORITHMS), possible + list(PUBLIC_KEY_ALGORITHMS)
    if not config["JWT_ALGORITHMS"]:
        return usual
    named = [name.strip() for name in config["JWT_ALGORITHMS"].split(",") if name.strip()]
    refused = [name for name in named if name not in possible]
    if refused or not named:
        raise ConfigError(f"JWT_ALGORITHMS may name {', '.join(possible)} with the keys set, "
                          f"not {', '.join(refused) or 'nothing'}")
    return named
