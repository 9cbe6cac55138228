"""Who may talk to the chat API: bearer tokens, the open /status page and conversation ownership."""

import base64
import hashlib
import hmac
import time

import jwt
import pytest

from auth import VerifiedTokens
from config import VERSION
from tests.helpers import (SECRET, assert_error, b64url, bearer, complete, run, seen_by_model, stored_counts,
                           stored_messages, token, wait_until)
from tests.fake_llm import Script

VALID_BODY = {"message": "hi"}

# The HS384/HS512 tokens are minted with the service's (HS256-sized) secret on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")


def claims(sub="alice"):
    """Ordinary, valid claims for `sub`."""
    now = int(time.time())
    return {"sub": sub, "iat": now, "exp": now + 3600}


def unsigned_token():
    """An `alg: none` token: header and claims with an empty signature."""
    return f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{b64url(claims())}."


def hmac_token_claiming(alg):
    """A token whose header claims `alg` but which is HMAC-SHA256-signed with the real secret."""
    signing_input = f"{b64url({'alg': alg, 'typ': 'JWT'})}.{b64url(claims())}"
    signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def auth(value):
    """Headers carrying `value` as the Authorization header."""
    return {"Authorization": value}


BAD_CREDENTIALS = {
    "no-authorization-header": lambda: {},
    "bearer-garbage": lambda: auth("Bearer not-a-jwt-at-all"),
    "bearer-without-token": lambda: auth("Bearer"),
    "basic-scheme": lambda: auth("Basic " + base64.b64encode(b"alice:password").decode()),
    "token-without-scheme": lambda: auth(token()),
    "signed-with-another-secret": lambda: auth("Bearer " + token(secret="another-secret-" + "x" * 40)),
    "expired": lambda: auth("Bearer " + token(lifetime=-60)),
    "alg-none": lambda: auth("Bearer " + unsigned_token()),
    "no-sub": lambda: auth("Bearer " + token(sub=None)),
    "empty-sub": lambda: auth("Bearer " + token(sub="")),
    "integer-sub": lambda: auth("Bearer " + token(sub=123)),
    "refresh-token": lambda: auth("Bearer " + token(type="refresh")),
    "not-yet-valid": lambda: auth("Bearer " + token(nbf=int(time.time()) + 3600)),
    "hs384-same-secret": lambda: auth("Bearer " + token(algorithm="HS384")),
    "hs512-same-secret": lambda: auth("Bearer " + token(algorithm="HS512")),
    "rs256-header-hmac-signed": lambda: auth("Bearer " + hmac_token_claiming("RS256")),
}


@pytest.mark.parametrize("headers", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
def test_bad_credentials_get_401(pg_client, headers):
    """A request without a valid HS256 access token gets 401 unauthorized."""
    response = pg_client.post("/chat/run", json=VALID_BODY, headers=headers())
    assert_error(response, 401, "unauthorized")


@pytest.mark.parametrize("headers", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
def test_bad_credentials_never_reach_the_model(pg_client, llm, headers):
    """A request refused with 401 never calls the model."""
    pg_client.post("/chat/run", json=VALID_BODY, headers=headers())
    assert llm.requests == []


@pytest.mark.parametrize("headers", BAD_CREDENTIALS.values(), ids=BAD_CREDENTIALS.keys())
def test_bad_credentials_store_nothing(pg_client, headers):
    """A request refused with 401 stores no conversation."""
    pg_client.post("/chat/run", json=VALID_BODY, headers=headers())
    assert stored_counts() == (0, 0)


@pytest.mark.parametrize("path", ["/chat/run", "/conversations"])
def test_options_with_a_valid_token_gets_401_not_an_error(pg_client, path):
    """flask-jwt-extended checks no token on OPTIONS; the service then vouches for none (401, never a 500)."""
    assert_error(pg_client.options(path, headers=bearer()), 401, "unauthorized")


def test_minimal_foreign_token_is_accepted(pg_client, llm):
    """A token of another system with only `sub` and `exp` (no type, jti, fresh) gets a reply."""
    llm.script(Script(reply="hello from the model"))
    foreign = jwt.encode({"sub": "alice", "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    response = pg_client.post("/chat/run", json=VALID_BODY, headers=auth("Bearer " + foreign))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["response"] == "hello from the model"


def test_a_token_accepted_before_is_refused_once_it_expires(pg_client, llm):
    """A token that was verified (and kept as verified) gets 401 from the moment it expires."""
    expires = int(time.time()) + 2
    short_lived = auth("Bearer " + jwt.encode({"sub": "alice", "exp": expires}, SECRET, algorithm="HS256"))
    assert pg_client.post("/chat/run", json=VALID_BODY, headers=short_lived).status_code == 200
    assert pg_client.post("/chat/run", json=VALID_BODY, headers=short_lived).status_code == 200
    assert wait_until(lambda: time.time() >= expires, timeout=10)
    response = pg_client.post("/chat/run", json=VALID_BODY, headers=short_lived)
    assert_error(response, 401, "unauthorized")
    assert response.get_json()["error"]["message"] == "the token has expired"
    assert len(llm.requests) == 2


def test_a_token_accepted_before_does_not_vouch_for_an_altered_one(pg_client):
    """Changing one character of an accepted token's signature gets 401, not the kept verdict."""
    good = token()
    assert pg_client.post("/chat/run", json=VALID_BODY, headers=auth("Bearer " + good)).status_code == 200
    altered = good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1]
    assert_error(pg_client.post("/chat/run", json=VALID_BODY, headers=auth("Bearer " + altered)),
                 401, "unauthorized")


def test_verified_tokens_forget_the_oldest_when_full():
    """The kept verdicts are bounded: past the limit the oldest is forgotten, so checked again."""
    kept = VerifiedTokens(size=2)
    far = time.time() + 3600
    kept.remember("Bearer a", {}, {"sub": "alice", "exp": far})
    kept.remember("Bearer b", {}, {"sub": "bob"})
    kept.remember("Bearer c", {}, {"sub": "carol", "exp": far})
    assert kept.claims_of("Bearer a") is None
    assert (kept.claims_of("Bearer b")[1]["sub"], kept.claims_of("Bearer c")[1]["sub"]) == ("bob", "carol")
    kept.remember("Bearer gone", {}, {"sub": "dave", "exp": time.time() - 1})
    assert kept.claims_of("Bearer gone") is None


def test_status_answers_without_token(pg_client):
    """GET /status needs no token and answers 200."""
    response = pg_client.get("/status")
    assert response.status_code == 200


def test_status_reports_database_cache_and_model(pg_client, llm):
    """GET /status with a token names the version, the state and round trip of the database and the cache, and the model."""
    body = pg_client.get("/status", headers=bearer()).get_json()
    assert body["version"] == VERSION
    expected = {"database": {"state": "ok", "backend": "postgresql"},
                "cache": {"state": "ok", "backend": "redis", "turn_leases": "shared"}}
    for part, described in expected.items():
        round_trip = body[part].pop("round_trip_ms")
        assert isinstance(round_trip, (int, float)) and 0 <= round_trip < 5000
        assert body[part] == described
    assert body["model"]["backend"] == "openai-compatible"
    assert body["model"]["base_url"] == llm.url


@pytest.fixture
def alices_conversation(client, llm):
    """The id of a conversation alice started (one turn)."""
    return run(client, "alice's secret plan", "alice-conv-1")["conversation_id"]


def post_as_bob(client, conversation_id):
    """Bob's turn naming `conversation_id`."""
    return client.post("/chat/run", json={"message": "bob was here", "conversation_id": conversation_id},
                       headers=bearer("bob"))


def test_owner_can_continue_own_conversation(client, alices_conversation):
    """Alice can add a turn to her own conversation."""
    run(client, "again", alices_conversation, user="alice")


def test_the_same_id_from_another_user_is_another_conversation(client, llm, alices_conversation):
    """Bob naming alice's conversation id starts a conversation of his own; nothing of hers reaches him."""
    response = post_as_bob(client, alices_conversation)
    assert response.status_code == 200
    assert "secret plan" not in response.get_data(as_text=True)
    assert seen_by_model(llm) == ["bob was here"]


def test_another_users_turn_leaves_the_owners_conversation_alone(client, alices_conversation):
    """Bob's turn with alice's id is kept in his conversation; hers keeps her two messages."""
    post_as_bob(client, alices_conversation)
    assert stored_messages(alices_conversation) == complete(("alice's secret plan", "echo: alice's secret plan"))
    assert stored_messages(alices_conversation, "bob") == complete(("bob was here", "echo: bob was here"))
