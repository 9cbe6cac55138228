// The page: signing in (a link's #token=, or a pasted token) and out, and wiring the
// conversation list to the chat view.

import * as api from "./api.js";
import { ChatView, replyInProgress } from "./chat.js";
import { ConversationList, titleOf } from "./conversations.js";

const $ = (id) => document.getElementById(id);
const NARROW = window.matchMedia("(max-width: 760px)");

const chat = new ChatView({ onSaved: showSaved });
const list = new ConversationList({
  onOpen: (id, title) => {
    closeSidebar();
    list.select(id);
    chat.open(id, title).then(() => $("message").focus());
  },
  onRenamed: (conversation) => chat.retitle(conversation),
  onDeleted: (id) => {
    if (chat.conversationId === id) newChat();
  },
});

/** Keep a token that came in the address (#token=...), take it out of the address bar; whether one came. */
function takeTokenFromAddress() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (!fragment.has("token")) return false;
  history.replaceState(null, "", location.pathname + location.search);
  const token = fragment.get("token").trim();
  if (token) api.token.set(token);
  return Boolean(token);
}

/** The token in what was pasted: a bare token, or a whole sign-in link. */
function tokenIn(pasted) {
  const text = pasted.trim();
  const link = text.indexOf("#token=");
  return link === -1 ? text : new URLSearchParams(text.slice(link + 1)).get("token").trim();
}

/** Show the sign-in form, with why the user is there if there is a reason to say. */
function showSignIn(reason = "") {
  replyInProgress.forget();
  $("app").hidden = true;
  $("sign-in").hidden = false;
  $("sign-in-reason").textContent = reason;
  $("sign-in-reason").hidden = !reason;
  $("token-input").value = "";
  $("token-input").focus();
}

/** With a token kept, show the app: the first page of conversations, and any reply to pick up. */
async function start(focusComposer = false) {
  const token = api.token.get();
  if (!token) return showSignIn();
  try {
    await list.reset();
  } catch (error) {
    return; // 401: onRefused has already shown the sign-in form.
  }
  $("sign-in").hidden = true;
  $("app").hidden = false;
  greet(token);
  const saved = replyInProgress.recall();
  if (saved) {
    list.select(saved.conversationId);
    await chat.resume(saved);
  } else {
    chat.showNew();
    if (focusComposer) $("message").focus();
  }
}

/** Show who is signed in, as the service names them, unless the token changed meanwhile. */
async function greet(token) {
  $("user-name").textContent = "";
  const user = await api.signedInUser();
  if (api.token.get() === token) $("user-name").textContent = user;
}

/** A turn was saved: put its conversation at the top of the list. */
async function showSaved(id) {
  try {
    const { conversation } = await api.conversationSummary(id);
    list.place(conversation);
    if (chat.conversationId === id) {
      list.select(id);
      chat.retitle({ id, title: titleOf(conversation) });
    }
  } catch {
    // The list catches up the next time it loads.
  }
}

/** Start a new conversation. */
function newChat() {
  closeSidebar();
  list.select(null);
  chat.showNew();
  $("message").focus();
}

/** Open or close the conversation list (a drawer on narrow screens). */
function toggleSidebar(open) {
  document.body.dataset.sidebar = open ? "open" : "closed";
  $("toggle-sidebar").setAttribute("aria-expanded", String(open));
  if (open) $("new-chat").focus();
}

/** Close the drawer, on narrow screens. */
function closeSidebar() {
  if (NARROW.matches && document.body.dataset.sidebar === "open") {
    toggleSidebar(false);
    $("toggle-sidebar").focus();
  }
}

api.onRefused((message) => {
  chat.abandonAll();
  showSignIn(`You were signed out because ${message.replace(/\.$/, "")}. `
    + "Open a new sign-in link, or paste a new token below.");
});

$("sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = tokenIn($("token-input").value);
  if (!token) {
    $("sign-in-reason").textContent = "Paste your access token first.";
    $("sign-in-reason").hidden = false;
    return;
  }
  api.token.set(token);
  start(true);
});

$("sign-out").addEventListener("click", () => {
  api.token.forget();
  chat.abandonAll();
  showSignIn("You signed out. This browser no longer keeps your token.");
});

$("skip-link").addEventListener("click", (event) => {
  event.preventDefault();
  $("message").focus();
});
$("new-chat").addEventListener("click", newChat);
$("toggle-sidebar").addEventListener("click", () => toggleSidebar(document.body.dataset.sidebar !== "open"));
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") closeSidebar();
});

// A sign-in link opened in a tab already showing the page only changes the fragment.
window.addEventListener("hashchange", () => {
  if (takeTokenFromAddress()) {
    chat.abandonAll();
    start(true);
  }
});

takeTokenFromAddress();
start();
