// Talking to the chat API, the same public API curl users have: the token, requests,
// errors in the one shape {"error": {"code", "message"}}, and streamed replies.

import { eventBatches } from "./sse.js";

const TOKEN_KEY = "chat.token";
const HISTORY_PAGE = 100;
export const LIST_PAGE = 20;

/** An error the API (or the network) answered, with when to try again if it said. */
export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

/** The bearer token, kept in this browser until sign-out. */
export const token = {
  get: () => localStorage.getItem(TOKEN_KEY),
  set: (value) => localStorage.setItem(TOKEN_KEY, value),
  forget: () => localStorage.removeItem(TOKEN_KEY),
};

let whenRefused = () => {};

/** Call `listener(message)` when the API refuses the token (401); the token is forgotten first. */
export function onRefused(listener) {
  whenRefused = listener;
}


/** Send a request with the token; the response if it is a success, else an ApiError thrown. */
async function send(method, path, { body, headers = {}, signal } = {}) {
  const kept = token.get();
  if (!kept) throw new ApiError(401, "unauthorized", "you are signed out");
  const init = { method, signal, cache: "no-store", headers: { ...headers, Authorization: `Bearer ${kept}` } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network", "the service could not be reached");
  }
  if (response.ok) return response;
  const error = await errorOf(response);
  if (error.status === 401) {
    token.forget();
    whenRefused(error.message);
  }
  throw error;
}

/** The ApiError a failed response carries, in the one error shape when it has it. */
async function errorOf(response) {
  let code = "http_error";
  let message = `the service answered ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") {
      ({ code, message } = body.error);
    }
  } catch {
    // Not JSON (a proxy's page, say): the status says enough.
  }
  return new ApiError(response.status, code, message, retryAfterSeconds(response));
}

/** Seconds until the time a Retry-After header gives (seconds or an HTTP date), or null. */
function retryAfterSeconds(response) {
  const value = response.headers.get("Retry-After");
  if (!value) return null;
  if (/^\d+$/.test(value.trim())) return Number(value.trim());
  const when = Date.parse(value);
  return Number.isNaN(when) ? null : Math.max(0, Math.ceil((when - Date.now()) / 1000));
}

/**
 * The signed-in user as the service names them ("user" of GET /status with the token: the claim
 * JWT_USER_CLAIM names, which the page cannot know); "" if the service does not say.
 */
export async function signedInUser() {
  try {
    const body = await (await send("GET", "/status")).json();
    return typeof body.user === "string" ? body.user : "";
  } catch {
    return "";
  }
}

const conversationPath = (id) => `/conversations/${encodeURIComponent(id)}`;

/** A page of the caller's conversations, newest first: {conversations, next_cursor}. */
export async function listConversations(cursor = null) {
  const query = new URLSearchParams({ limit: String(LIST_PAGE) });
  if (cursor) query.set("cursor", cursor);
  return (await send("GET", `/conversations?${query}`)).json();
}

/** A conversation and all its messages, every page read: {conversation, messages}. */
export async function readConversation(id) {
  const messages = [];
  let cursor = null;
  let conversation;
  do {
    const query = new URLSearchParams({ limit: String(HISTORY_PAGE) });
    if (cursor) query.set("cursor", cursor);
    const page = await (await send("GET", `${conversationPath(id)}?${query}`)).json();
    conversation = page.conversation;
    messages.push(...page.messages);
    cursor = page.next_cursor;
  } while (cursor);
  return { conversation, messages };
}

/** A conversation without its messages: {conversation}. */
export async function conversationSummary(id) {
  return (await send("GET", `${conversationPath(id)}?limit=1`)).json();
}

/** Give a conversation a new title; the renamed conversation. */
export async function renameConversation(id, title) {
  const response = await send("PATCH", conversationPath(id), { body: { title } });
  return (await response.json()).conversation;
}

/** Delete a conversation and its messages. */
export async function deleteConversation(id) {
  await send("DELETE", conversationPath(id));
}

/** Ask the service to stop the reply streaming in a conversation. */
export async function stopReply(conversationId) {
  await send("POST", "/chat/stop", { body: { conversation_id: conversationId } });
}

/** Start a turn: {conversationId, batches}, batches yielding the reply's events as they come. */
export async function startReply(message, conversationId, signal) {
  const body = { message };
  if (conversationId) body.conversation_id = conversationId;
  const response = await send("POST", "/chat/stream", { body, signal });
  return { conversationId: response.headers.get("X-Conversation-Id") || conversationId,
           batches: eventBatches(response.body) };
}

/**
 * Pick a reply up again after `lastEventId` (from its first event without one):
 * {conversationId, batches}, or null when the service has nothing to resume (204).
 */
export async function resumeReply(conversationId, lastEventId, signal) {
  const headers = lastEventId ? { "Last-Event-ID": lastEventId } : {};
  const response = await send("GET", `/chat/stream/${encodeURIComponent(conversationId)}`, { headers, signal });
  if (response.status === 204) return null;
  return { conversationId, batches: eventBatches(response.body) };
}
