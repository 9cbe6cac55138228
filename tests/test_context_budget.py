"""The context budget (LLM_CONTEXT_TOKENS): which history goes to the model, and messages too big for it."""

# Sizes follow turns.py: a message costs ceil(len/4) tokens plus 4 for its framing. The system
# prompt "Be brief." costs 3 + 4 = 7, the new message "new question" 3 + 4 = 7, and every
# earlier message below is 40 characters: 10 + 4 = 14.

import pytest

import models
from tests.fake_llm import Script
from tests.helpers import assert_error, bearer, run, seen_by_model, sent_to_model, stored_counts

SYSTEM = "Be brief."
NEW = "new question"
HEAD_AND_NEW = 7 + 7
MESSAGE = 14


def padded(text):
    """`text` padded with dots to 40 characters (14 tokens with framing)."""
    return text.ljust(40, ".")


TURNS = [(padded(f"question {n}"), padded(f"answer {n}")) for n in (1, 2, 3)]


def turn_messages(numbers):
    """The user and assistant messages of the given earlier turns (1 to 3), in order."""
    return [message for n in numbers for message in (
        {"role": "user", "content": TURNS[n - 1][0]}, {"role": "assistant", "content": TURNS[n - 1][1]})]


@pytest.fixture
def budget_app(make_pg_app, llm):
    """Conversation c1 with three 40-character turns; then an app with the budget given."""
    builder = make_pg_app(LLM_SYSTEM_PROMPT=SYSTEM)
    client = builder.test_client()
    for question, answer in TURNS:
        llm.script(Script(reply=answer))
        run(client, question, "c1")

    def with_budget(tokens, system_prompt=SYSTEM):
        """An app on the same data with LLM_CONTEXT_TOKENS=tokens."""
        models.db.obj.close_all()
        return make_pg_app(empty=False, LLM_SYSTEM_PROMPT=system_prompt, LLM_CONTEXT_TOKENS=tokens)

    return with_budget


def sent_for_new_message(app, llm):
    """The messages the model receives for NEW on c1 (the model then fails, so nothing is kept)."""
    llm.script(Script(status=500))
    response = app.test_client().post("/chat/run", json={"message": NEW, "conversation_id": "c1"},
                                      headers=bearer())
    assert response.status_code == 502, response.get_json()
    return sent_to_model(llm)


BUDGETS = [  # (LLM_CONTEXT_TOKENS, the earlier turns sent)
    (HEAD_AND_NEW + 6 * MESSAGE, [1, 2, 3]),      # exactly fits everything
    (HEAD_AND_NEW + 6 * MESSAGE - 1, [2, 3]),     # turn 1's question no longer fits, its answer goes too
    (HEAD_AND_NEW + 4 * MESSAGE, [2, 3]),         # exactly two turns
    (HEAD_AND_NEW + 4 * MESSAGE - 1, [3]),        # a half turn 2 is dropped, not sent as an orphan reply
    (HEAD_AND_NEW + 2 * MESSAGE, [3]),            # exactly the last turn
    (HEAD_AND_NEW + 2 * MESSAGE - 1, []),         # only the last answer would fit: nothing is sent
    (HEAD_AND_NEW, []),                           # room for the system prompt and the message only
]


@pytest.mark.parametrize("budget, kept", BUDGETS, ids=[str(b) for b, _ in BUDGETS])
def test_the_oldest_turns_are_dropped_to_fit_the_budget(budget_app, llm, budget, kept):
    """The model gets the system prompt, the newest whole turns that fit, and the new message."""
    sent = sent_for_new_message(budget_app(budget), llm)
    assert sent == ([{"role": "system", "content": SYSTEM}] + turn_messages(kept)
                    + [{"role": "user", "content": NEW}])


def cost(messages):
    """The token estimate turns.py makes for messages."""
    return sum(-(-len(m["content"]) // 4) + 4 for m in messages)


@pytest.mark.parametrize("budget", range(HEAD_AND_NEW, HEAD_AND_NEW + 6 * MESSAGE + 3))
def test_every_budget_sends_a_fitting_suffix_that_starts_with_a_question(budget_app, llm, budget):
    """For any budget the history sent fits, is the newest part of the conversation, and starts with the user."""
    sent = sent_for_new_message(budget_app(budget), llm)
    history = sent[1:-1]
    assert sent[0]["role"] == "system" and sent[-1] == {"role": "user", "content": NEW}
    assert cost(sent) <= budget
    assert history == turn_messages([1, 2, 3])[len(turn_messages([1, 2, 3])) - len(history):]
    assert history == [] or history[0]["role"] == "user"


def test_without_a_system_prompt_the_whole_budget_goes_to_history(budget_app, llm):
    """With no system prompt its tokens are room for history instead."""
    sent = sent_for_new_message(budget_app(7 + 4 * MESSAGE, system_prompt=None), llm)
    assert sent == turn_messages([2, 3]) + [{"role": "user", "content": NEW}]


@pytest.fixture
def small_app(make_pg_app):
    """An app with a 60-token budget and a 7-token system prompt: a message may cost up to 53."""
    return make_pg_app(LLM_SYSTEM_PROMPT=SYSTEM, LLM_CONTEXT_TOKENS=60)


@pytest.mark.parametrize("path", ["/chat/run", "/chat/stream"])
def test_a_message_over_the_budget_alone_is_413(small_app, llm, path):
    """A message that cannot fit even without history is refused with context_too_large."""
    response = small_app.test_client().post(path, json={"message": "x" * 197}, headers=bearer())
    assert_error(response, 413, "context_too_large")
    message = response.get_json()["error"]["message"]
    assert "context" in message and "60" in message


@pytest.mark.parametrize("path", ["/chat/run", "/chat/stream"])
def test_a_message_over_the_budget_never_reaches_the_model_or_the_database(small_app, llm, path):
    """The refused message is neither sent nor stored, in a new or an existing conversation."""
    client = small_app.test_client()
    run(client, "hi", "c1")
    calls = len(llm.requests)
    for conversation_id in ("c1", "c2"):
        client.post(path, json={"message": "x" * 197, "conversation_id": conversation_id}, headers=bearer())
    assert len(llm.requests) == calls
    assert stored_counts() == (1, 2)


def test_a_message_that_just_fits_the_budget_is_answered(small_app, llm):
    """A message costing exactly what the budget leaves after the system prompt is sent."""
    response = small_app.test_client().post("/chat/run", json={"message": "x" * 196}, headers=bearer())
    assert response.status_code == 200, response.get_json()
    assert seen_by_model(llm)[-1] == "x" * 196
