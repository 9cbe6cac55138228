"""Tokens from the company's identity provider: a real JWKS endpoint on loopback, keys made in the test."""

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

import chat_app
import token_keys
from config import ConfigError
from tests.helpers import SECRET, assert_error, b64url, flask_cli, free_port, stored_conversation, token, wait_until

ISSUER = "https://sso.example.internal/realms/staff"
AUDIENCE = "chat-api"
BODY = {"message": "hi"}
OTHER_SECRET = "the-secret-before-the-rotation-0123456789abcdef"


class SigningKey:
    """A key pair as an identity provider holds one: it signs tokens, and its public half is a JWK."""

    def __init__(self, kid, algorithm):
        """A new key named `kid`: RSA 2048 for RS256 (or RS384, PS256), else P-256 for ES256."""
        self.kid, self.algorithm = kid, algorithm
        if self.is_rsa:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())

    @property
    def is_rsa(self):
        """Whether the key is an RSA one."""
        return self.algorithm.startswith(("RS", "PS"))

    def jwk(self):
        """The public key as the provider's JWKS lists it."""
        kind = RSAAlgorithm if self.is_rsa else ECAlgorithm
        return {**kind.to_jwk(self.private.public_key(), as_dict=True),
                "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def pem(self):
        """The public key in PEM, as JWT_PUBLIC_KEY takes it."""
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def token(self, sub="alice", lifetime=3600, kid=None, **claims):
        """A token the provider would issue: signed with this key, with its kid, issuer and audience."""
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + lifetime, "sub": sub, **claims}
        payload = {name: value for name, value in payload.items() if value is not None}
        return jwt.encode(payload, self.private, algorithm=self.algorithm, headers={"kid": kid or self.kid})


@pytest.fixture(scope="module")
def keys():
    """The provider's keys (made once a module: RSA key generation takes a while)."""
    return {"rsa": SigningKey("rsa-1", "RS256"), "rsa-next": SigningKey("rsa-2", "RS256"),
            "ec": SigningKey("ec-1", "ES256"), "impostor": SigningKey("rsa-1", "RS256"),
            "rs384": SigningKey("rsa-384", "RS384"), "ps256": SigningKey("rsa-pss", "PS256")}


class JWKSServer:
    """An identity provider's JWKS endpoint on loopback: serves `keys`, counts fetches, breaks on purpose.

    `behaviour`: "up"; "error" (HTTP 500); "hang" (answers only after `release` or 10 s); "trickle"
    (sends its headers at once, then one byte of the body every 0.2 s).
    """

    def __init__(self):
        """Listening on a free loopback port."""
        self.keys = []
        self.fetches = 0
        self.behaviour = "up"
        self.release = threading.Event()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            """One GET of the JWKS."""

            def do_GET(self):  # noqa: N802 - the name http.server calls
                """Answer as the endpoint behaves now."""
                endpoint.answer(self)

            def log_message(self, *args):
                """Quiet."""

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, handler):
        """The JWKS, or the failure asked for."""
        self.fetches += 1
        if self.behaviour == "hang":
            self.release.wait(10)
        body = json.dumps({"keys": [key.jwk() for key in self.keys]}).encode()
        handler.send_response(500 if self.behaviour == "error" else 200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if self.behaviour == "trickle":
            for byte in body:
                if self.release.wait(0.2):
                    return
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
        handler.wfile.write(body)

    def stop(self):
        """Stop listening: a fetch now finds the port closed."""
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks(keys):
    """A JWKS endpoint listing the RSA and EC keys."""
    endpoint = JWKSServer()
    endpoint.keys = [keys["rsa"], keys["ec"]]
    yield endpoint
    endpoint.stop()


class Clock:
    """A monotonic clock the test moves forward (the provider's keys are refetched by it)."""

    def __init__(self):
        """Now."""
        self.now = time.monotonic()

    def __call__(self):
        """The time it says."""
        return self.now

    def advance(self, seconds):
        """Move on `seconds`."""
        self.now += seconds


@pytest.fixture
def clock():
    """A clock for the provider's keys."""
    return Clock()


@pytest.fixture
def make_idp_app(make_pg_app, jwks, clock):
    """Build apps that take tokens from the loopback provider only (no JWT_SECRET_KEY), on `clock`."""
    def make(**settings):
        """An app with `settings` over the provider's."""
        app = make_pg_app(**{"JWT_SECRET_KEY": None, "JWT_JWKS_URL": jwks.url, "JWT_ISSUER": ISSUER,
                             "JWT_AUDIENCE": AUDIENCE, "JWT_JWKS_TIMEOUT_SECONDS": 0.5, **settings})
        provider = app.extensions["token_keys"].provider
        if provider is not None:
            provider.clock = clock
        return app
    return make


@pytest.fixture
def idp_client(make_idp_app):
    """A test client of an app on the loopback provider."""
    return make_idp_app().test_client()


def post(client, token_text):
    """POST /chat/run with `token_text` as the bearer token."""
    return client.post("/chat/run", json=BODY, headers={"Authorization": f"Bearer {token_text}"})


def assert_refused(response, mentions=None):
    """The response is 401 unauthorized."""
    assert_error(response, 401, "unauthorized", mentions)


def hmac_signed(header, secret, sub="alice"):
    """A token with `header`, HMAC-SHA256-signed with `secret` (bytes), as an attacker would make one."""
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 600}
    signing_input = f"{b64url(header)}.{b64url(claims)}"
    return f"{signing_input}.{b64url(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


# Accepted


@pytest.mark.parametrize("name", ["rsa", "ec"], ids=["RS256", "ES256"])
def test_a_providers_token_is_accepted_and_names_the_user(idp_client, keys, name):
    """An RS256 or ES256 token signed by a key the provider lists gets a reply, as its `sub`."""
    response = post(idp_client, keys[name].token(sub="alice@corp"))
    assert response.status_code == 200, response.get_json()
    assert stored_conversation(response.get_json()["conversation_id"], owner="alice@corp") is not None


def test_the_keys_are_fetched_once_for_many_tokens(idp_client, jwks, keys):
    """Tokens of keys already fetched are checked without asking the provider again."""
    for name in ("rsa", "ec", "rsa", "ec"):
        assert post(idp_client, keys[name].token(jti=name + str(time.time()))).status_code == 200
    assert jwks.fetches == 1


def test_a_new_key_at_the_provider_is_fetched_once_and_accepted(idp_client, jwks, keys, clock):
    """After the provider rotates to a new key, its first token fetches the keys once; later ones don't."""
    assert post(idp_client, keys["rsa"].token()).status_code == 200
    jwks.keys = [keys["rsa"], keys["rsa-next"]]
    clock.advance(token_keys.REFETCH_SECONDS)
    for user in ("alice", "bob", "carol"):
        response = post(idp_client, keys["rsa-next"].token(sub=user))
        assert response.status_code == 200, response.get_json()
    assert jwks.fetches == 2


def test_a_user_claim_other_than_sub_names_the_user(make_idp_app, keys):
    """With JWT_USER_CLAIM=email, the user is the token's email, not its opaque sub."""
    client = make_idp_app(JWT_USER_CLAIM="email").test_client()
    response = post(client, keys["rsa"].token(sub="00u1f9x7", email="alice@example.com"))
    assert response.status_code == 200, response.get_json()
    conversation_id = response.get_json()["conversation_id"]
    assert stored_conversation(conversation_id, owner="alice@example.com") is not None
    assert stored_conversation(conversation_id, owner="00u1f9x7") is None


def test_status_names_the_user_the_user_claim_names(make_idp_app, keys):
    """/status with a token says who the caller is by JWT_USER_CLAIM (the page greets them with it); without, nobody."""
    client = make_idp_app(JWT_USER_CLAIM="email").test_client()
    signed = keys["rsa"].token(sub="00u1f9x7", email="alice@example.com")
    assert client.get("/status", headers={"Authorization": f"Bearer {signed}"}).get_json()["user"] == \
        "alice@example.com"
    assert "user" not in client.get("/status").get_json()


@pytest.mark.parametrize("email", [None, "", 42, "x" * 256, "a\x00b"],
                         ids=["missing", "empty", "number", "too-long", "nul"])
def test_a_token_without_a_usable_user_claim_gets_401(make_idp_app, keys, email):
    """With JWT_USER_CLAIM=email, a token whose email is missing or not 1 to 255 characters of text gets 401."""
    client = make_idp_app(JWT_USER_CLAIM="email").test_client()
    assert_refused(post(client, keys["rsa"].token(email=email)))


def test_a_pem_public_key_verifies_tokens_without_a_jwks(make_pg_app, keys):
    """JWT_PUBLIC_KEY (a PEM, here kept on one line with \\n) verifies the key's tokens; no provider is asked."""
    client = make_pg_app(JWT_SECRET_KEY=None, JWT_PUBLIC_KEY=keys["ec"].pem().replace("\n", "\\n")).test_client()
    assert post(client, keys["ec"].token()).status_code == 200
    assert_refused(post(client, keys["rsa"].token()))


# Refused


@pytest.mark.parametrize("claims, mentions", [
    ({"aud": "another-api"}, "audience"), ({"aud": None}, None),
    ({"iss": "https://evil.example/realms/staff"}, "issuer"), ({"iss": None}, None),
], ids=["wrong-audience", "no-audience", "wrong-issuer", "no-issuer"])
def test_a_token_for_another_audience_or_from_another_issuer_gets_401(idp_client, keys, claims, mentions):
    """With JWT_AUDIENCE and JWT_ISSUER set, a token must carry both, and the right ones."""
    assert_refused(post(idp_client, keys["rsa"].token(**claims)), mentions)


def test_any_of_several_audiences_will_do(make_idp_app, keys):
    """JWT_AUDIENCE may name several audiences, comma-separated."""
    client = make_idp_app(JWT_AUDIENCE="api://chat, chat-api").test_client()
    assert post(client, keys["rsa"].token()).status_code == 200
    assert post(client, keys["rsa"].token(aud="api://chat")).status_code == 200
    assert_refused(post(client, keys["rsa"].token(aud="other")))


def test_a_token_signed_by_another_key_under_a_listed_kid_gets_401(idp_client, keys):
    """A token whose kid the provider lists but that another key signed gets 401."""
    assert_refused(post(idp_client, keys["impostor"].token()))


def test_an_expired_token_of_the_provider_gets_401(idp_client, keys):
    """A provider's token past its exp gets 401, saying so."""
    assert_refused(post(idp_client, keys["rsa"].token(lifetime=-60)), "expired")


def test_an_unknown_kid_fetches_the_keys_at_most_once_a_minute(idp_client, jwks, keys, clock):
    """Tokens naming keys the provider does not list get 401; the keys are fetched at most once a minute."""
    for attempt in range(5):
        assert_refused(post(idp_client, keys["rsa"].token(kid=f"made-up-{attempt}")), "kid")
    assert jwks.fetches == 1
    clock.advance(token_keys.REFETCH_SECONDS - 1)
    assert_refused(post(idp_client, keys["rsa"].token(kid="made-up-again")))
    assert jwks.fetches == 1
    clock.advance(1)
    assert_refused(post(idp_client, keys["rsa"].token(kid="made-up-later")))
    assert jwks.fetches == 2


# Tokens signed as they should be with an algorithm the provider's settings leave out, and the
# settings that accept that algorithm too.
NOT_CONFIGURED = {
    "HS256": (lambda keys: token(iss=ISSUER, aud=AUDIENCE), {"JWT_SECRET_KEY": SECRET}),
    "RS384": (lambda keys: keys["rs384"].token(), {"JWT_ALGORITHMS": "RS256,RS384"}),
    "PS256": (lambda keys: keys["ps256"].token(), {"JWT_ALGORITHMS": "RS256,PS256"}),
}


@pytest.mark.parametrize("alg", NOT_CONFIGURED)
def test_a_token_whose_alg_is_not_configured_gets_401(make_idp_app, jwks, keys, alg):
    """Only RS256 and ES256 are accepted from the provider: a token rightly signed with another algorithm gets
    401, and the same token passes once the settings accept its algorithm (so nothing else refused it)."""
    jwks.keys = [keys["rsa"], keys["ec"], keys["rs384"], keys["ps256"]]
    signed, accepting = NOT_CONFIGURED[alg]
    signed = signed(keys)
    assert jwt.get_unverified_header(signed)["alg"] == alg
    assert_refused(post(make_idp_app().test_client(), signed))
    assert post(make_idp_app(**accepting).test_client(), signed).status_code == 200


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_an_unsigned_token_gets_401(idp_client, keys, alg):
    """`alg: none`, however it is spelled, with the empty signature such a token has, gets 401."""
    header = {"alg": alg, "typ": "JWT", "kid": keys["rsa"].kid}
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600}
    assert_refused(post(idp_client, f"{b64url(header)}.{b64url(claims)}."))


def test_jwt_algorithms_narrows_what_the_provider_may_use(make_idp_app, keys):
    """JWT_ALGORITHMS=RS256 refuses the provider's ES256 tokens."""
    client = make_idp_app(JWT_ALGORITHMS="RS256").test_client()
    assert post(client, keys["rsa"].token()).status_code == 200
    assert_refused(post(client, keys["ec"].token()))


CONFUSION_SETUPS = {
    "public-key-only": lambda key, jwks: {"JWT_SECRET_KEY": None, "JWT_PUBLIC_KEY": key.pem()},
    "public-key-and-secret": lambda key, jwks: {"JWT_PUBLIC_KEY": key.pem()},
    "jwks-only": lambda key, jwks: {"JWT_SECRET_KEY": None, "JWT_JWKS_URL": jwks.url},
    "jwks-and-secret": lambda key, jwks: {"JWT_JWKS_URL": jwks.url},
}


@pytest.mark.parametrize("setup", CONFUSION_SETUPS.values(), ids=CONFUSION_SETUPS.keys())
@pytest.mark.parametrize("as_secret", ["pem", "jwk-json"])
def test_an_hs256_token_signed_with_the_public_key_gets_401(make_pg_app, keys, jwks, setup, as_secret):
    """The classic confusion attack: HS256 with the RSA public key (PEM or JWK) as the HMAC secret gets 401."""
    key = keys["rsa"]
    client = make_pg_app(JWT_ISSUER=ISSUER, JWT_AUDIENCE=AUDIENCE, **setup(key, jwks)).test_client()
    assert post(client, key.token()).status_code == 200
    public = key.pem().encode() if as_secret == "pem" else json.dumps(key.jwk()).encode()
    for header in ({"alg": "HS256", "typ": "JWT"}, {"alg": "HS256", "typ": "JWT", "kid": key.kid}):
        assert_refused(post(client, hmac_signed(header, public)))


# The service's own secret, rotated


def test_tokens_of_the_previous_secret_are_accepted_during_a_rotation(make_pg_app):
    """With JWT_SECRET_KEY_PREVIOUS, tokens signed with either secret are accepted; a third secret's are not."""
    client = make_pg_app(JWT_SECRET_KEY=SECRET, JWT_SECRET_KEY_PREVIOUS=OTHER_SECRET).test_client()
    assert post(client, token(secret=OTHER_SECRET)).status_code == 200
    assert post(client, token(secret=SECRET)).status_code == 200
    assert_refused(post(client, token(secret="a-third-secret-nobody-configured-0123456789")))


def test_the_previous_secret_is_refused_once_the_rotation_ends(make_pg_app):
    """Without JWT_SECRET_KEY_PREVIOUS, a token of the old secret gets 401."""
    client = make_pg_app(JWT_SECRET_KEY=SECRET).test_client()
    assert_refused(post(client, token(secret=OTHER_SECRET)))


def test_an_expired_token_of_the_previous_secret_says_it_expired(make_pg_app):
    """A token of the previous secret past its exp gets 401 "expired", as one of the current secret would."""
    client = make_pg_app(JWT_SECRET_KEY=SECRET, JWT_SECRET_KEY_PREVIOUS=OTHER_SECRET).test_client()
    assert_refused(post(client, token(secret=OTHER_SECRET, lifetime=-60)), "expired")


def test_create_token_signs_with_the_current_secret_during_a_rotation(make_pg_app, monkeypatch):
    """create-token's tokens are signed with JWT_SECRET_KEY, not the previous one."""
    app = make_pg_app(JWT_SECRET_KEY=SECRET, JWT_SECRET_KEY_PREVIOUS=OTHER_SECRET)
    printed = flask_cli(app, monkeypatch, "create-token", "alice").output.strip()
    assert jwt.decode(printed, SECRET, algorithms=["HS256"])["sub"] == "alice"
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(printed, OTHER_SECRET, algorithms=["HS256"])


def test_create_token_carries_the_audience_and_issuer_checked(make_pg_app, keys, jwks, monkeypatch):
    """With a secret beside the provider, create-token's tokens carry JWT_AUDIENCE and JWT_ISSUER, and pass."""
    app = make_pg_app(JWT_JWKS_URL=jwks.url, JWT_AUDIENCE=AUDIENCE, JWT_ISSUER=ISSUER)
    printed = flask_cli(app, monkeypatch, "create-token", "alice").output.strip()
    assert post(app.test_client(), printed).status_code == 200


def test_create_token_says_it_cannot_mint_for_an_identity_provider(make_idp_app, monkeypatch):
    """Without JWT_SECRET_KEY, create-token exits 1 with one line saying why, and prints no token."""
    result = flask_cli(make_idp_app(), monkeypatch, "create-token", "alice")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith("Error: create-token cannot mint tokens for your identity provider")


# The provider down or slow


def test_a_provider_that_is_down_gets_401_at_once(make_idp_app, keys):
    """With nobody listening at JWT_JWKS_URL, a token gets 401 quickly, and the service goes on answering."""
    client = make_idp_app(JWT_JWKS_URL=f"http://127.0.0.1:{free_port()}/jwks").test_client()
    started = time.monotonic()
    for _ in range(3):
        assert_refused(post(client, keys["rsa"].token()))
    assert time.monotonic() - started < 2
    assert client.get("/status").status_code == 200


@pytest.mark.parametrize("behaviour", ["hang", "error", "stopped"])
def test_keys_fetched_before_keep_working_while_the_provider_is_down(idp_client, jwks, keys, clock, behaviour):
    """When the provider hangs, fails or is gone, tokens of keys held are accepted; unknown kids get 401 quickly."""
    assert post(idp_client, keys["rsa"].token()).status_code == 200
    if behaviour == "stopped":
        jwks.stop()
    jwks.behaviour = behaviour
    clock.advance(token_keys.KEYS_FRESH_SECONDS + 1)  # the keys are due a refresh, which fails
    started = time.monotonic()
    response = post(idp_client, keys["ec"].token(sub="bob"))
    assert response.status_code == 200, response.get_json()
    assert time.monotonic() - started < 3  # at most one fetch, cut off at JWT_JWKS_TIMEOUT_SECONDS (0.5)
    started = time.monotonic()
    for _ in range(3):
        assert_refused(post(idp_client, keys["rsa-next"].token()))
        assert post(idp_client, keys["rsa"].token(sub="carol", jti=str(time.time()))).status_code == 200
    assert time.monotonic() - started < 1  # no fetch: one was tried less than a minute ago


def test_a_slow_provider_is_given_up_after_the_timeout(make_idp_app, jwks, keys):
    """A provider that does not answer costs one request JWT_JWKS_TIMEOUT_SECONDS, then 401."""
    jwks.behaviour = "hang"
    client = make_idp_app(JWT_JWKS_TIMEOUT_SECONDS=0.5).test_client()
    started = time.monotonic()
    assert_refused(post(client, keys["rsa"].token()))
    assert 0.4 < time.monotonic() - started < 3
    assert jwks.fetches == 1


# Settings the service will not start with


def pem_of_a_private_key(keys):
    """A private key's PEM, which is not what JWT_PUBLIC_KEY takes."""
    return keys["rsa"].private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()).decode()


BAD_SETTINGS = {
    "public-key-and-jwks": (lambda keys: {"JWT_PUBLIC_KEY": keys["rsa"].pem(),
                                          "JWT_JWKS_URL": "https://sso.example/jwks"}, "not both"),
    "public-key-not-pem": (lambda keys: {"JWT_PUBLIC_KEY": "ssh-rsa AAAA"}, "JWT_PUBLIC_KEY"),
    "public-key-private": (lambda keys: {"JWT_PUBLIC_KEY": pem_of_a_private_key(keys)}, "JWT_PUBLIC_KEY"),
    "jwks-url-not-http": (lambda keys: {"JWT_JWKS_URL": "file:///etc/passwd"}, "JWT_JWKS_URL"),
    "jwks-timeout-zero": (lambda keys: {"JWT_JWKS_URL": "https://sso.example/jwks",
                                        "JWT_JWKS_TIMEOUT_SECONDS": 0}, "JWT_JWKS_TIMEOUT_SECONDS"),
    "previous-secret-short": (lambda keys: {"JWT_SECRET_KEY": SECRET, "JWT_SECRET_KEY_PREVIOUS": "short"},
                              "JWT_SECRET_KEY_PREVIOUS"),
    "previous-secret-alone": (lambda keys: {"JWT_SECRET_KEY": None, "JWT_JWKS_URL": "https://sso.example/jwks",
                                            "JWT_SECRET_KEY_PREVIOUS": OTHER_SECRET}, "JWT_SECRET_KEY_PREVIOUS"),
    "hs256-without-secret": (lambda keys: {"JWT_SECRET_KEY": None, "JWT_JWKS_URL": "https://sso.example/jwks",
                                           "JWT_ALGORITHMS": "HS256,RS256"}, "JWT_ALGORITHMS"),
    "algorithm-none": (lambda keys: {"JWT_JWKS_URL": "https://sso.example/jwks", "JWT_ALGORITHMS": "none"},
                       "JWT_ALGORITHMS"),
    "ec-algorithm-for-an-rsa-key": (lambda keys: {"JWT_PUBLIC_KEY": keys["rsa"].pem(), "JWT_ALGORITHMS": "ES256"},
                                    "JWT_ALGORITHMS"),
}


@pytest.mark.parametrize("settings, mentions", BAD_SETTINGS.values(), ids=BAD_SETTINGS.keys())
def test_the_service_refuses_to_start_with_bad_identity_settings(tmp_path, keys, settings, mentions):
    """Settings that cannot work stop create_app with one line naming the setting (and no key material)."""
    base = {"APP_ENV": "production", "JWT_SECRET_KEY": SECRET, "DATABASE_URL": f"sqlite:///{tmp_path / 'x.db'}",
            "REDIS_URL": None, "LLM_BASE_URL": None}
    given = settings(keys)
    with pytest.raises(ConfigError, match=mentions) as refused:
        chat_app.create_app({**base, **given})
    for value in (SECRET, *given.values()):
        assert not isinstance(value, str) or len(value) < 20 or value not in refused.value.message


# The running service


def bearer_request(service, token_text, timeout=10):
    """POST /chat/run to the running service with `token_text`."""
    return requests.post(service.url + "/chat/run", json=BODY, timeout=timeout,
                         headers={"Authorization": f"Bearer {token_text}", "Connection": "close"})


def test_the_service_starts_with_only_a_provider_and_accepts_its_tokens(start_service, jwks, keys):
    """Under gunicorn in production with no JWT_SECRET_KEY: the provider's tokens work, and go on working when it is gone."""
    service = start_service(JWT_SECRET_KEY="", JWT_JWKS_URL=jwks.url, JWT_AUDIENCE=AUDIENCE,
                            JWT_ISSUER=ISSUER, JWT_JWKS_TIMEOUT_SECONDS=1)
    for name in ("rsa", "ec"):
        response = bearer_request(service, keys[name].token())
        assert response.status_code == 200, response.text
    assert_refused(bearer_request(service, keys["rsa"].token(aud="another-api")), "audience")
    assert_refused(bearer_request(service, token()))  # HS256: not configured
    jwks.stop()
    assert bearer_request(service, keys["rsa"].token(sub="bob")).status_code == 200
    started = time.monotonic()
    assert_refused(bearer_request(service, keys["rsa-next"].token()), "kid")
    assert time.monotonic() - started < 1
    assert jwks.fetches == 1


def test_a_trickling_provider_is_cut_off_without_holding_the_worker(start_service, jwks, keys):
    """A JWKS sent a byte at a time is cut off at JWT_JWKS_TIMEOUT_SECONDS in all; the worker answers others meanwhile."""
    jwks.behaviour = "trickle"
    service = start_service(JWT_SECRET_KEY="", JWT_JWKS_URL=jwks.url, JWT_JWKS_TIMEOUT_SECONDS=1)
    answered = {}

    def ask():
        """The request that waits on the fetch."""
        started = time.monotonic()
        answered["response"] = bearer_request(service, keys["rsa"].token(iss=None, aud=None))
        answered["seconds"] = time.monotonic() - started

    asking = threading.Thread(target=ask)
    asking.start()
    assert wait_until(lambda: jwks.fetches == 1, timeout=5)
    started = time.monotonic()
    assert requests.get(service.url + "/status", timeout=5).status_code == 200
    assert time.monotonic() - started < 0.5
    asking.join(10)
    assert_refused(answered["response"])
    assert 0.9 < answered["seconds"] < 3
