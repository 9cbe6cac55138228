"""The chat page in a real browser: Debian's Chromium driven by Playwright, against the service
under gunicorn + gevent with PostgreSQL, Redis and the fake model."""

import contextlib
import os
import re
import subprocess
import sys

import jwt
import pytest
import requests

from tests.browser import CHROMIUM, CHROMIUM_ARGS, RECORD_REPLY_STATES, TIMEOUT_MS, TRAPS, ChatPage
from tests.helpers import ROOT, SECRET, phase_failed, service_missing, through, token
from tests.fake_llm import Script
from tests.faults import TcpProxy

XSS = "<img src=x onerror=alert(1)>"
METRICS = re.compile(r"^\d+ tokens? · \d+\.\d s$")


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium, headless, for the whole run (skipped locally without it, failed in CI)."""
    try:
        from playwright.sync_api import Error, expect, sync_playwright
    except ImportError as exc:
        service_missing("Playwright (pip install playwright)", exc)
    if not os.access(CHROMIUM, os.X_OK):
        service_missing("Chromium (apt-get install chromium)", f"{CHROMIUM} is missing")
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Error as exc:
            service_missing("Chromium", exc)
        yield chromium
        chromium.close()


@contextlib.contextmanager
def browser_tab(browser, request, tmp_path, **options):
    """A fresh browser tab (its own storage) with the script-injection traps; a screenshot if the test fails."""
    context = browser.new_context(**options)
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script(TRAPS)
    page = context.new_page()
    dialogs, errors = [], []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.type), dialog.dismiss()))
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    if phase_failed(request):
        path = tmp_path / "failure.png"
        page.screenshot(path=path, full_page=True)
        print(f"screenshot of the page when the test failed: {path}")
    context.close()
    assert dialogs == [], "the page opened a native dialog"
    assert errors == [], "the page's scripts threw"


@pytest.fixture
def tab(browser, request, tmp_path):
    """A tab of a desktop browser's size."""
    with browser_tab(browser, request, tmp_path, viewport={"width": 1280, "height": 800}) as page:
        yield page


@pytest.fixture
def phone_tab(browser, request, tmp_path):
    """A tab of a phone's size, with a touch screen."""
    with browser_tab(browser, request, tmp_path, viewport={"width": 375, "height": 740}, is_mobile=True,
                     has_touch=True) as page:
        yield page


@pytest.fixture
def chat(service, tab):
    """The chat page of the service, not yet signed in.

    The service comes first so the tab closes first: gunicorn waits for the browser's open connections.
    """
    return ChatPage(tab, service)


@pytest.fixture
def expect(browser):
    """Playwright's expect, imported once the browser fixture has checked Playwright is there."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect


def words(count, prefix="word"):
    """A reply of `count` numbered words."""
    return " ".join(f"{prefix}{n}" for n in range(count))


def sign_in_link(service, *args):
    """The link `flask --app chat_app create-token alice --link ARGS` prints, run as an operator would."""
    flask = os.path.join(os.path.dirname(sys.executable), "flask")
    printed = subprocess.run([flask, "--app", "chat_app", "create-token", "alice", "--link", *args],
                             cwd=ROOT, env=service.env, capture_output=True, text=True, timeout=60, check=True)
    return printed.stdout.strip()


# Signing in and out


def test_a_sign_in_link_signs_in_and_leaves_no_token_in_the_address_bar(chat, service, expect):
    """The --link link opens the chat; the token is kept in the browser, gone from the address, never sent."""
    link = sign_in_link(service, "--base-url", service.url)
    bearer_token = link.split("#token=", 1)[1]
    chat.page.goto(link)
    expect(chat.page.locator("#app")).to_be_visible()
    expect(chat.page.locator("#user-name")).to_have_text("alice")
    assert chat.page.url == service.url + "/"
    assert chat.page.evaluate("localStorage.getItem('chat.token')") == bearer_token
    assert bearer_token not in service.output()


def test_create_token_link_defaults_to_localhost_on_the_port(make_app, tmp_path):
    """Without --base-url the link points at http://localhost:PORT/, and holds a token for the user."""
    app = make_app(DATABASE_URL=f"sqlite:///{tmp_path / 'cli.db'}", REDIS_URL=None, PORT=8123)
    result = app.test_cli_runner().invoke(args=["create-token", "alice", "--link"])
    assert result.exit_code == 0, result.output
    link = result.output.strip()
    assert link.startswith("http://localhost:8123/#token=")
    assert jwt.decode(link.split("#token=")[1], SECRET, algorithms=["HS256"])["sub"] == "alice"


def test_a_pasted_sign_in_link_signs_in(chat, expect):
    """The sign-in form takes a token, or a whole link, pasted into it."""
    chat.page.goto(chat.service.url + "/")
    expect(chat.page.locator("#sign-in")).to_be_visible()
    chat.token = token("alice")
    chat.page.get_by_label("Access token").fill(f"{chat.service.url}/#token={chat.token}")
    chat.page.get_by_role("button", name="Sign in").click()
    expect(chat.page.locator("#app")).to_be_visible()
    expect(chat.box).to_be_focused()


def test_a_sign_in_link_opened_on_the_sign_in_form_signs_in(chat, expect):
    """A link opened in a tab already showing the page (only the fragment changes) still signs in."""
    chat.page.goto(chat.service.url + "/")
    expect(chat.page.locator("#sign-in")).to_be_visible()
    chat.open_link(token("alice"))
    expect(chat.page.locator("#app")).to_be_visible()
    assert chat.page.url == chat.service.url + "/"


def test_an_expired_token_returns_the_page_to_sign_in_with_a_sentence(chat, expect):
    """A token that expired while the page was open sends the user back to sign in, saying why."""
    chat.sign_in()
    chat.page.evaluate("expired => localStorage.setItem('chat.token', expired)", token("alice", lifetime=-60))
    chat.send("hello?")
    expect(chat.page.locator("#sign-in")).to_be_visible()
    reason = chat.page.locator("#sign-in-reason")
    expect(reason).to_have_text(re.compile("signed out because the token has expired"))
    assert chat.page.evaluate("localStorage.getItem('chat.token')") is None


def test_an_expired_link_shows_sign_in_with_a_sentence(chat, expect):
    """Opening a link whose token has expired shows the sign-in form and why, not an empty page."""
    chat.open_link(token("alice", lifetime=-60))
    expect(chat.page.locator("#sign-in-reason")).to_contain_text("the token has expired")
    expect(chat.page.locator("#app")).to_be_hidden()


def test_the_page_greets_the_user_by_the_name_the_service_knows_them_by(start_service, tab, expect):
    """With JWT_USER_CLAIM=email the page shows the token's email (from /status), not its opaque sub."""
    chat = ChatPage(tab, start_service(JWT_USER_CLAIM="email"))
    chat.sign_in("00u1f9x7", email="alice@example.com")
    expect(chat.page.locator("#user-name")).to_have_text("alice@example.com")


def test_sign_out_forgets_the_token(chat, expect):
    """Sign out returns to the sign-in form and the browser keeps no token."""
    chat.sign_in()
    chat.page.get_by_role("button", name="Sign out").click()
    expect(chat.page.locator("#sign-in")).to_be_visible()
    assert chat.page.evaluate("localStorage.getItem('chat.token')") is None


# Chatting


def test_a_reply_appears_word_by_word_then_its_tokens_and_time(chat, llm, expect):
    """While a reply streams its words appear one after another; then the tokens and time show under it."""
    reply = "one two three four five six seven eight"
    llm.script(Script(reply=reply, chunk_delay=0.25))
    chat.sign_in()
    chat.page.evaluate(RECORD_REPLY_STATES)
    chat.send("count to eight")
    expect(chat.user_messages.last).to_have_text("count to eight")
    expect(chat.reply).to_contain_text("one two")
    assert "eight" not in chat.reply.text_content()
    expect(chat.reply_meta).to_be_hidden()
    expect(chat.reply_meta).to_have_text(METRICS)
    expect(chat.reply).to_have_text(reply)
    states = chat.page.evaluate("window.__replyStates")
    assert len(states) >= 5, states
    assert all(later.startswith(earlier) for earlier, later in zip(states, states[1:])), states
    assert chat.replies.last.locator(".body[aria-live=polite]").count() == 1


def test_stop_ends_a_long_reply_and_the_stopped_text_stays(chat, llm, expect):
    """Stop ends a streaming reply; what had arrived stays on the page and is what the service saved."""
    full = words(300)
    llm.script(Script(reply=full, chunk_delay=0.05))
    chat.sign_in()
    chat.send("talk for a long time")
    expect(chat.reply).to_contain_text("word3")
    chat.page.get_by_role("button", name="Stop").click()
    expect(chat.reply_meta).to_contain_text("Stopped")
    shown = chat.reply.text_content()
    assert full.startswith(shown) and "word3" in shown and len(shown) < len(full)
    expect(chat.page.get_by_role("button", name="Send")).to_be_visible()
    [conversation] = chat.stored_conversations()
    saved = chat.stored_messages(conversation["id"])[-1]
    assert (saved["content"], saved["status"]) == (shown, "stopped")
    chat.page.get_by_role("button", name="New chat").click()
    chat.conversation("talk for a long time").locator(".open").click()
    expect(chat.reply).to_have_text(shown)
    expect(chat.reply_meta).to_have_text("Stopped")


def test_a_reload_mid_reply_continues_it_without_repeating_text(start_service, tab, llm, expect):
    """Reloaded while a reply streams, the page picks it up where it was: every word once, to the end."""
    chat = ChatPage(tab, start_service(STREAM_RESUME_GRACE_SECONDS=20))
    full = words(40)
    llm.script(Script(reply=full, chunk_delay=0.15))
    chat.sign_in()
    chat.send("a reply to survive a reload")
    expect(chat.reply).to_contain_text("word3")
    chat.page.reload()
    ended = chat.replies.last.locator(".meta:not([hidden]), .error:not([hidden])").first
    expect(ended).to_be_visible(timeout=20_000)
    expect(chat.reply_meta).to_have_text(METRICS)
    expect(chat.reply).to_have_text(full)
    expect(chat.replies).to_have_count(1)
    expect(chat.user_messages).to_have_text(["a reply to survive a reload"])
    [conversation] = chat.stored_conversations()
    assert chat.stored_messages(conversation["id"])[-1]["content"] == full


def resumed_stream(request):
    """Whether a request of the page is a resume (GET /chat/stream/{id})."""
    return request.method == "GET" and "/chat/stream/" in request.url


def test_a_reload_before_the_model_answered_gets_a_new_chats_reply_from_its_start(start_service, tab, llm, expect):
    """Reloaded after a new chat's message went but before the model answered (the service has sent nothing, not
    even the conversation's id), the page asks for the reply from its first event and shows all of it, once."""
    chat = ChatPage(tab, start_service(STREAM_RESUME_GRACE_SECONDS=20))
    full = words(12)
    llm.script(Script(reply=full, header_delay=30))
    chat.sign_in()
    chat.send("a reply the model holds back")
    assert llm.wait_for_requests(1)
    with chat.page.expect_request(resumed_stream) as resumed:
        chat.page.reload()
    assert "last-event-id" not in resumed.value.headers
    expect(chat.replies).to_have_count(1)
    llm.release()
    expect(chat.reply_meta).to_have_text(METRICS)
    expect(chat.reply).to_have_text(full)
    expect(chat.reply_error).to_be_hidden()
    expect(chat.user_messages).to_have_text(["a reply the model holds back"])
    expect(chat.page.locator("#messages .notice")).to_have_count(0)
    [conversation] = chat.stored_conversations()
    assert [m["content"] for m in chat.stored_messages(conversation["id"])] == ["a reply the model holds back", full]
    assert resumed.value.url.endswith(f"/chat/stream/{conversation['id']}")


def test_a_stream_that_breaks_before_its_first_event_is_picked_up_from_its_start(start_service, tab, llm, expect):
    """The connection drops after the response began but before any event came: the page asks for the reply
    again without Last-Event-ID and shows it whole."""
    # The model holds its first chunk until released: longer than the usual test timeout, since the proxy's cut
    # may take seconds to see every connection closed.
    service = start_service(STREAM_RESUME_GRACE_SECONDS=20, SSE_HEARTBEAT_SECONDS=1, LLM_TIMEOUT_SECONDS=20)
    proxy = TcpProxy("127.0.0.1", service.port).start()
    try:
        chat = ChatPage(tab, service, url=f"http://127.0.0.1:{proxy.port}")
        full = words(12)
        llm.script(Script(reply=full, first_chunk_delay=30))
        chat.sign_in()
        with chat.page.expect_response(lambda response: response.request.method == "POST"
                                       and response.url.endswith("/chat/stream")):
            chat.send("a reply whose connection breaks")
        with chat.page.expect_request(resumed_stream) as resumed:
            proxy.cut()
        assert "last-event-id" not in resumed.value.headers
        llm.release()
        expect(chat.reply_meta).to_have_text(METRICS)
        expect(chat.reply).to_have_text(full)
        expect(chat.reply_error).to_be_hidden()
        expect(chat.replies).to_have_count(1)
        expect(chat.page.locator("#messages .notice")).to_have_count(0)
    finally:
        proxy.stop()


def test_events_of_another_turn_start_the_reply_again(chat, expect):
    """Resumed events of the saved turn add to its text; events of another turn replace it, from their start."""
    chat.page.goto(chat.service.url + "/")
    expect(chat.page.locator("#sign-in")).to_be_visible()
    taken = chat.page.evaluate("""async () => {
      const { takeEvents } = await import("/static/js/chat.js");
      const event = (id, content, final = false) =>
        ({ lastEventId: id, data: JSON.stringify({ content, is_final: final }) });
      const same = { text: "saved ", lastEventId: "aaaa:2" };
      const sameFinal = takeEvents(same, [event("aaaa:3", "and more")]);
      const other = { text: "saved ", lastEventId: "aaaa:2" };
      const otherFinal = takeEvents(other,
        [event("bbbb:1", "another "), event("bbbb:2", "turn"), event("bbbb:3", "", true)]);
      const fresh = { text: "", lastEventId: null };
      takeEvents(fresh, [event("cccc:1", "first")]);
      return [[same.text, same.lastEventId, Boolean(same.unconfirmed), sameFinal],
              [other.text, other.lastEventId, Boolean(other.unconfirmed), Boolean(otherFinal && otherFinal.is_final)],
              [fresh.text, fresh.lastEventId, Boolean(fresh.unconfirmed)]];
    }""")
    assert taken == [["saved and more", "aaaa:3", False, None], ["another turn", "bbbb:3", True, True],
                     ["first", "cccc:1", False]]


def test_line_breaks_and_code_blocks_show_as_such(chat, llm, expect):
    """Line breaks stay line breaks and a ``` block is a code block, its HTML-looking text kept as text."""
    llm.script(Script(reply="Here it is:\nline two\n```python\nprint('<b>hi</b>')\n```\nDone."))
    chat.sign_in()
    chat.send("show me code")
    expect(chat.reply_meta).to_have_text(METRICS)
    paragraphs = chat.replies.last.locator("p.text")
    expect(paragraphs).to_have_text(["Here it is:\nline two", "Done."], use_inner_text=True)
    expect(chat.replies.last.locator(".code-block code")).to_have_text("print('<b>hi</b>')")
    expect(chat.replies.last.locator(".code-language")).to_have_text("python")
    assert chat.replies.last.locator("b").count() == 0


@pytest.mark.parametrize("script, settings, sentence", [
    (Script(status=500), {}, "The model could not answer (the model answered HTTP 500"),
    (Script(status=429, retry_after="7"), {}, "The model is busy right now. Try again in 7 seconds."),
    (Script(hang=True), {"LLM_TIMEOUT_SECONDS": 1}, "The model took too long to answer."),
], ids=["model-error-502", "model-rate-limited-503", "model-timeout-504"])
def test_an_error_shows_where_the_reply_would_be(start_service, tab, llm, expect, script, settings, sentence):
    """A failed turn says what happened where its reply would be, and gives the message back to send again."""
    chat = ChatPage(tab, start_service(**settings))
    llm.script(script)
    chat.sign_in()
    chat.send("will this work?")
    expect(chat.reply_error).to_contain_text(sentence)
    expect(chat.box).to_have_value("will this work?")
    expect(chat.page.get_by_role("button", name="Send")).to_be_visible()


def test_the_services_rate_limit_says_when_to_try_again(start_service, tab, llm, expect):
    """Past RATE_LIMIT_PER_MINUTE (here used up by another client of the same user) the reply's place says 429's
    when to retry, and the message goes back in the box."""
    service = start_service(RATE_LIMIT_PER_MINUTE=5)
    chat = ChatPage(tab, service)
    chat.sign_in()
    for _ in range(10):
        if service.request("GET", "/conversations").status_code == 429:
            break
    chat.send("one more?")
    expect(chat.reply_error).to_have_text(re.compile(r"^Too many requests for now\. Try again in \d+ seconds?\.$"))
    expect(chat.box).to_have_value("one more?")
    assert len(llm.requests) == 0


def test_a_database_outage_says_so_where_the_reply_would_be(start_service, tab, llm, pg_proxy, expect):
    """With the database gone after sign-in, a message's 503 is said where its reply would be; it can be sent again."""
    chat = ChatPage(tab, start_service(DATABASE_URL=through(pg_proxy)))
    chat.sign_in()
    pg_proxy.stop()
    chat.send("is anyone there?")
    expect(chat.reply_error).to_have_text(
        "The service is unavailable right now (the database is unavailable). Try again in a moment.")
    expect(chat.box).to_have_value("is anyone there?")
    assert len(llm.requests) == 0


def test_a_busy_conversation_says_so_where_the_reply_would_be(chat, llm, service, expect):
    """A message to a conversation that is still answering another (409) is told to wait."""
    service.post("/chat/run", {"message": "start", "conversation_id": "busy-1"})
    llm.script(Script(reply=words(100), chunk_delay=0.2))
    running = service.stream("keep talking", "busy-1")
    chat.sign_in()
    chat.conversation("start").locator(".open").click()
    expect(chat.user_messages.first).to_have_text("start")
    chat.send("me too")
    expect(chat.reply_error).to_contain_text("still busy with another reply")
    running.close()


# The conversation list


def test_the_list_shows_a_new_conversation_and_renames_and_deletes_it(chat, expect):
    """A conversation appears in the list once answered; rename changes its title; delete asks first."""
    chat.sign_in()
    chat.send("plan the offsite")
    entry = chat.conversation("plan the offsite")
    expect(entry).to_have_count(1)
    expect(entry.locator(".open")).to_have_attribute("aria-current", "page")

    entry.hover()
    entry.get_by_role("button", name="Rename “plan the offsite”").click()
    chat.page.get_by_label("Title").fill("Offsite, June")
    chat.page.get_by_label("Title").press("Enter")
    expect(chat.conversation("Offsite, June")).to_have_count(1)
    expect(chat.page.locator("#chat-title")).to_have_text("Offsite, June")
    assert [c["title"] for c in chat.stored_conversations()] == ["Offsite, June"]

    entry = chat.conversation("Offsite, June")
    entry.hover()
    entry.get_by_role("button", name="Delete “Offsite, June”").click()
    chat.page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    expect(chat.conversations).to_have_count(1)
    entry.hover()
    entry.get_by_role("button", name="Delete “Offsite, June”").click()
    chat.page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    expect(chat.conversations).to_have_count(0)
    expect(chat.page.locator("#chat-title")).to_have_text("New chat")
    assert chat.stored_conversations() == []


def test_the_list_loads_older_conversations_as_it_scrolls(chat, service, expect):
    """The list shows 20 conversations, newest first, and the rest once scrolled to its end."""
    for n in range(25):
        service.post("/chat/run", {"message": f"topic {n:02d}", "conversation_id": f"topic-{n:02d}"})
    chat.sign_in()
    expect(chat.conversations).to_have_count(20)
    expect(chat.conversations.first.locator(".title")).to_have_text("topic 24")
    chat.page.locator("#more-conversations").scroll_into_view_if_needed()
    expect(chat.conversations).to_have_count(25)
    expect(chat.conversations.last.locator(".title")).to_have_text("topic 00")
    expect(chat.page.locator("#more-conversations")).to_be_hidden()


def test_at_phone_width_the_list_is_a_drawer_and_nothing_runs_off_the_screen(service, phone_tab, llm, expect):
    """At 375 px the conversation list opens as a drawer over the chat, the box and Send are on screen and work
    by touch, and no page content (a long word, a wide code block) makes the page scroll sideways."""
    chat = ChatPage(phone_tab, service)
    llm.script(Script(reply="A long line:\n```\n" + "x = 1; " * 60 + "\n```\n" + "y" * 200))
    chat.sign_in()
    sidebar = chat.page.locator("#sidebar")
    expect(sidebar).to_be_hidden()
    expect(chat.box).to_be_in_viewport(ratio=1)
    chat.box.tap()
    chat.box.fill("a" * 300)
    send = chat.page.get_by_role("button", name="Send")
    expect(send).to_be_in_viewport(ratio=1)
    send.tap()
    expect(chat.reply_meta).to_have_text(METRICS)
    assert chat.page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    chat.page.get_by_role("button", name="Conversations").tap()
    expect(sidebar).to_be_visible()
    expect(sidebar).to_be_in_viewport()
    chat.page.get_by_role("button", name="New chat").tap()
    expect(sidebar).to_be_hidden()
    expect(chat.page.locator("#chat-title")).to_have_text("New chat")
    chat.page.get_by_role("button", name="Conversations").tap()
    chat.conversations.first.locator(".open").tap()
    expect(sidebar).to_be_hidden()
    expect(chat.user_messages).to_have_text(["a" * 300])
    assert chat.page.evaluate("document.documentElement.scrollWidth <= innerWidth")


# What must never happen


def test_html_in_a_message_and_a_title_stays_text(chat, expect):
    """A message and a title holding HTML show as text; no element is made from them and no script runs."""
    chat.sign_in()
    chat.send(XSS)
    expect(chat.reply_meta).to_have_text(METRICS)
    expect(chat.user_messages.last).to_have_text(XSS)
    expect(chat.reply).to_have_text(f"echo: {XSS}")
    entry = chat.conversation(XSS)
    expect(entry).to_have_count(1)
    entry.hover()
    entry.locator(".rename").click()
    assert chat.trapped() == []
    chat.page.get_by_label("Title").fill("<script>alert(2)</script><img src=y onerror=alert(3)>")
    chat.page.get_by_label("Title").press("Enter")
    expect(chat.page.locator("#chat-title")).to_have_text("<script>alert(2)</script><img src=y onerror=alert(3)>")
    expect(chat.conversations.first.locator(".title")).to_have_text(
        "<script>alert(2)</script><img src=y onerror=alert(3)>")
    chat.page.reload()
    chat.conversations.first.locator(".open").click()
    expect(chat.user_messages.last).to_have_text(XSS)
    assert chat.page.locator("#app img, #app script").count() == 0
    assert chat.trapped() == []


def test_keyboard_only_tab_to_the_box_type_and_enter_sends(chat, expect):
    """With the keyboard alone: Tab reaches the box, Shift+Enter makes a new line, Enter sends."""
    chat.sign_in()
    keyboard = chat.page.keyboard
    keyboard.press("Tab")
    expect(chat.page.get_by_role("link", name="Skip to the message box")).to_be_focused()
    keyboard.press("Enter")
    expect(chat.box).to_be_focused()
    keyboard.type("line one")
    keyboard.press("Shift+Enter")
    keyboard.type("line two")
    expect(chat.box).to_have_value("line one\nline two")
    expect(chat.user_messages).to_have_count(0)
    keyboard.press("Enter")
    expect(chat.user_messages.last).to_have_text("line one\nline two", use_inner_text=True)
    expect(chat.reply_meta).to_have_text(METRICS)
    expect(chat.box).to_have_value("")
    expect(chat.box).to_be_focused()


def test_the_stream_parser_follows_the_sse_rules(chat, expect):
    """The page's SSE parser splits lines on CR, LF and CRLF (even across reads), joins data lines, keeps ids (an
    empty id resets it, one with NUL is ignored), drops one leading BOM and one space after the colon, and reads a
    long line that comes in many small pieces."""
    chat.page.goto(chat.service.url + "/")
    expect(chat.page.locator("#sign-in")).to_be_visible()
    cases = [
        (["data: a\n\n"], [["a", ""]]),
        (["data: a\r\n\r\ndata: b\r\r"], [["a", ""], ["b", ""]]),
        (["data: a\r", "\n\r", "\n"], [["a", ""]]),
        (["data: one\ndata:two\n\n"], [["one\ntwo", ""]]),
        ([": ping\n\n", "data: x\n\n"], [["x", ""]]),
        (["id: t1:4\ndata: x\n\n", "data: y\n\n"], [["x", "t1:4"], ["y", "t1:4"]]),
        (["data\n\n"], [["", ""]]),
        (["event: note\n\n", "data: z\n\n"], [["z", ""]]),
        (["data: kept\n\ndata: dropped"], [["kept", ""]]),
        (["data: é\n\n"], [["é", ""]]),
        (["\ufeffdata: a\n\n"], [["a", ""]]),
        (["\ufeff", "\ufeffdata: a\n\n", "data: b\n\n"], [["b", ""]]),
        (["data:  two spaces\n\n"], [[" two spaces", ""]]),
        (["id: t1:4\ndata: x\n\n", "id: t1\u00005\ndata: y\n\n"], [["x", "t1:4"], ["y", "t1:4"]]),
        (["id: t1:4\ndata: x\n\n", "id\ndata: y\n\n", "id: t1:6\ndata: z\n\nid: \ndata: w\n\n"],
         [["x", "t1:4"], ["y", ""], ["z", "t1:6"], ["w", ""]]),
        (["data: ", *["0123456789"] * 20000, "\r", "\n\n"], [["0123456789" * 20000, ""]]),
    ]
    parsed = chat.page.evaluate("""async (cases) => {
      const { EventStreamParser } = await import("/static/js/sse.js");
      return cases.map(([pieces]) => {
        const parser = new EventStreamParser();
        const events = [...pieces.flatMap((piece) => parser.push(piece)), ...parser.end()];
        return events.map((event) => [event.data, event.lastEventId]);
      });
    }""", cases)
    assert parsed == [expected for _, expected in cases]


# How the page is served


def test_the_page_and_its_files_carry_the_security_headers(service):
    """The page and every file it loads are served with a strict CSP, no referrer and nosniff."""
    for path in ["/", "/static/js/main.js", "/static/js/sse.js", "/static/css/chat.css"]:
        response = requests.get(service.url + path, timeout=5)
        assert response.status_code == 200, path
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy, path
        assert "frame-ancestors 'none'" in policy and "unsafe" not in policy, path
        assert response.headers["Referrer-Policy"] == "no-referrer", path
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
    assert requests.get(service.url + "/static/js/main.js", timeout=5).headers["Content-Type"].startswith(
        ("text/javascript", "application/javascript"))


def test_the_page_holds_no_inline_script_or_style(service):
    """Every script and style of the page is a file of its own, so the CSP can forbid inline ones."""
    html = requests.get(service.url + "/", timeout=5).text
    assert re.findall(r"<script\b[^>]*>", html) == ['<script type="module" src="/static/js/main.js">']
    assert "<style" not in html and re.search(r"<[^>]*\s(style|on\w+)=", html) is None


def test_api_responses_stay_as_they_were(service):
    """The API's responses carry none of the page's headers: curl users see what they saw before."""
    response = requests.get(service.url + "/status", timeout=5)
    assert "Content-Security-Policy" not in response.headers
    assert response.headers["Content-Type"] == "application/json"


def test_web_ui_off_serves_no_page(start_service):
    """With WEB_UI=off neither the page nor its files are served; the API still is."""
    service = start_service(WEB_UI="off")
    for path in ["/", "/static/js/main.js"]:
        response = requests.get(service.url + path, timeout=5)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert requests.get(service.url + "/status", timeout=5).status_code == 200
