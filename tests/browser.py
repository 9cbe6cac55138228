"""Driving the chat page in Debian's Chromium with Playwright: how to launch it, and the page's parts."""

import os

import requests

from tests.helpers import token

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 15_000

# Runs before the page's own scripts in every document: an injected script that got to run
# would call alert(), and one the Content-Security-Policy blocked is a violation; both are kept.
TRAPS = """
window.__alerts = [];
for (const name of ["alert", "confirm", "prompt"]) {
  window[name] = (...args) => { window.__alerts.push(`${name}(${args.join(", ")})`); return null; };
}
window.__violations = [];
document.addEventListener("securitypolicyviolation",
  (event) => window.__violations.push(`${event.violatedDirective} ${event.blockedURI}`));
"""

# Records the text of the last reply each time the message list changes, to see it grow.
RECORD_REPLY_STATES = """
() => {
  window.__replyStates = [];
  new MutationObserver(() => {
    const bodies = document.querySelectorAll("#messages .message.assistant .body");
    const text = bodies.length ? bodies[bodies.length - 1].textContent : "";
    const states = window.__replyStates;
    if (text && states[states.length - 1] !== text) states.push(text);
  }).observe(document.getElementById("messages"), { childList: true, subtree: true, characterData: true });
}
"""


class ChatPage:
    """The chat page of a running service, open in a browser tab."""

    def __init__(self, page, service, url=None):
        """Wrap a Playwright page of the service at `url` (its own address unless given); nothing is loaded yet."""
        self.page = page
        self.service = service
        self.url = url or service.url
        self.token = None

    def sign_in(self, user="alice", **claims):
        """Open the page through a sign-in link for `user` and wait until the chat shows."""
        self.open_link(token(user, **claims))
        self.page.locator("#app").wait_for(state="visible")
        return self

    def open_link(self, bearer_token):
        """Open the page with a token in the fragment, as a `create-token --link` link does."""
        self.token = bearer_token
        self.page.goto(f"{self.url}/#token={bearer_token}")

    def send(self, text):
        """Type a message in the box and press Enter."""
        self.box.fill(text)
        self.box.press("Enter")

    @property
    def box(self):
        """The message box."""
        return self.page.locator("#message")

    @property
    def replies(self):
        """The replies in the open conversation."""
        return self.page.locator("#messages .message.assistant")

    @property
    def reply(self):
        """The text of the last reply."""
        return self.replies.last.locator(".body")

    @property
    def reply_meta(self):
        """The quiet line under the last reply."""
        return self.replies.last.locator(".meta")

    @property
    def reply_error(self):
        """The error shown where the last reply is."""
        return self.replies.last.locator(".error")

    @property
    def user_messages(self):
        """The user's messages in the open conversation."""
        return self.page.locator("#messages .message.user .body")

    @property
    def conversations(self):
        """The entries of the conversation list."""
        return self.page.locator("#conversation-list > li")

    def conversation(self, title):
        """The list entry whose title is `title`."""
        return self.conversations.filter(has=self.page.locator(".title", has_text=title))

    def api(self, method, path, **kwargs):
        """Call the service's API with the token the page signed in with."""
        headers = {"Authorization": f"Bearer {self.token}", "Connection": "close"}
        return requests.request(method, self.service.url + path, headers=headers, timeout=10, **kwargs)

    def stored_conversations(self):
        """The conversations the service keeps for the signed-in user."""
        return self.api("GET", "/conversations").json()["conversations"]

    def stored_messages(self, conversation_id):
        """The messages the service keeps for a conversation."""
        return self.api("GET", f"/conversations/{conversation_id}").json()["messages"]

    def trapped(self):
        """Script-injection traps: the alert() calls and the CSP violations seen so far."""
        return self.page.evaluate("[...window.__alerts, ...window.__violations]")
