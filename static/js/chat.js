// The chat view: a conversation's messages, the composer, a reply as it streams (with Stop),
// its tokens and time, errors where the reply would be, and a reply picked up after a reload.

import * as api from "./api.js";
import { renderText } from "./message.js";

const $ = (id) => document.getElementById(id);
const IN_PROGRESS_KEY = "chat.replyInProgress";
const MAX_RESUMES = 3;
const STATUS_NOTES = { stopped: "Stopped", interrupted: "Interrupted", error: "Ended by an error" };
const FINISHED = new Set(["complete", ...Object.keys(STATUS_NOTES)]);

/** The reply streaming in this tab, kept in sessionStorage so a reloaded page can pick it up. */
export const replyInProgress = {
  recall() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(IN_PROGRESS_KEY));
      return saved && typeof saved.conversationId === "string" ? saved : null;
    } catch {
      return null;
    }
  },
  remember(turn) {
    if (!turn.conversationId) return;
    const { conversationId, lastEventId, message, text, messagesBefore } = turn;
    sessionStorage.setItem(IN_PROGRESS_KEY,
      JSON.stringify({ conversationId, lastEventId, message, text, messagesBefore }));
  },
  forget() {
    sessionStorage.removeItem(IN_PROGRESS_KEY);
  },
};

/**
 * A new conversation's id, chosen by the page so that a reply can be picked up after a reload even
 * before the service has answered: a random (version 4) UUID. crypto.randomUUID() would need a secure
 * context, which a page served over plain http:// on an intranet is not.
 */
export function newConversationId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = [...bytes].map((byte) => byte.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** The turn an event id names (ids are `<turn>:<n>`), or null without one. */
export function turnOf(eventId) {
  return eventId ? eventId.split(":")[0] : null;
}

/**
 * Add a batch of a reply's events to its turn: the text grows and the last event id moves on; returns
 * the final event's payload if the batch holds it. Events of another turn than the one the text came
 * from start the text again from theirs (never one turn's text run on into another's), and leave the
 * turn unconfirmed: the history says, once it ends, whose reply it was.
 */
export function takeEvents(turn, events) {
  let final = null;
  for (const event of events) {
    if (event.lastEventId) {
      const known = turnOf(turn.lastEventId);
      if (known !== null && turnOf(event.lastEventId) !== known) {
        turn.text = "";
        turn.unconfirmed = true;
      }
      turn.lastEventId = event.lastEventId;
    }
    const payload = parsed(event.data);
    if (payload && payload.is_final) final = payload;
    else if (payload && typeof payload.content === "string") turn.text += payload.content;
  }
  return final;
}

/** What to tell the user about an error, shown where the reply would be. */
export function sentenceFor(error) {
  const retry = error.retryAfter === null || error.retryAfter === undefined
    ? "in a moment" : `in ${error.retryAfter} second${error.retryAfter === 1 ? "" : "s"}`;
  switch (error.code) {
    case "conversation_busy":
      return "This conversation is still busy with another reply. Send again once it has finished.";
    case "rate_limited":
      return `Too many requests for now. Try again ${retry}.`;
    case "llm_rate_limited":
      return `The model is busy right now. Try again ${retry}.`;
    case "llm_timeout":
      return "The model took too long to answer. Try again.";
    case "network":
      return "The service could not be reached. Check your connection and try again.";
    default:
  }
  if (error.status === 502) return `The model could not answer (${error.message}). Try again.`;
  if (error.status === 503) return `The service is unavailable right now (${error.message}). Try again ${retry}.`;
  return `The message could not be answered: ${error.message}.`;
}

/** The quiet line under a finished reply: how it ended, its tokens and time. */
export function metricsLine(final) {
  const parts = [];
  if (final.finish_reason === "length") parts.push("Cut short at the length limit");
  else if (STATUS_NOTES[final.finish_reason] && !final.error) parts.push(STATUS_NOTES[final.finish_reason]);
  const metrics = final.metrics || {};
  if (Number.isFinite(metrics.token_count)) {
    parts.push(`${metrics.token_count} token${metrics.token_count === 1 ? "" : "s"}`);
  }
  if (Number.isFinite(metrics.processing_time)) parts.push(`${metrics.processing_time.toFixed(1)} s`);
  return parts.join(" · ");
}

/** A new element with a class. */
function element(tag, className) {
  const node = document.createElement(tag);
  node.className = className;
  return node;
}

/** One message on screen: its text, a quiet line under it and a place for an error. */
class MessageView {
  constructor(role, live = false) {
    this.node = element("article", `message ${role}`);
    this.node.setAttribute("aria-label", role === "user" ? "You" : "Reply");
    this.body = element("div", "body");
    if (live) {
      this.body.setAttribute("aria-live", "polite");
      this.typing = element("span", "typing");
      this.typing.setAttribute("aria-hidden", "true");
      this.typing.append(element("span", "dot"), element("span", "dot"), element("span", "dot"));
    }
    this.meta = element("p", "meta");
    this.meta.hidden = true;
    this.error = element("p", "error");
    this.error.setAttribute("role", "alert");
    this.error.hidden = true;
    this.node.append(this.body, ...(this.typing ? [this.typing] : []), this.meta, this.error);
  }

  /** Show the text so far (the typing dots only while there is none and it is still coming). */
  show(text) {
    renderText(this.body, text);
    if (this.typing) this.typing.hidden = text !== "";
  }

  /** Say something quietly under the message. */
  note(text) {
    this.meta.textContent = text;
    this.meta.hidden = !text;
  }

  /** The reply is complete (or stopped, or ended by an error). */
  finish(final) {
    if (this.typing) this.typing.hidden = true;
    this.note(metricsLine(final));
    if (final.error) this.fail(`The reply broke off: ${final.error.message}.`);
  }

  /** Show what went wrong where the reply is. */
  fail(sentence) {
    if (this.typing) this.typing.hidden = true;
    this.error.textContent = sentence;
    this.error.hidden = false;
  }
}

export class ChatView {
  /** `onSaved(conversationId)` hears of each turn the service saved. */
  constructor({ onSaved }) {
    this.messages = $("messages");
    this.empty = $("empty-state");
    this.title = $("chat-title");
    this.input = $("message");
    this.sendButton = $("send");
    this.stopButton = $("stop");
    this.onSaved = onSaved;
    this.conversationId = null;
    this.shownCount = 0;
    this.turn = null;
    this.openings = 0;
    this.running = new Set();
    this.unloading = false;
    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    this.input.addEventListener("keydown", (event) => {
      if (event.key !== "Enter" || event.shiftKey || event.isComposing) return;
      event.preventDefault();
      this.send();
    });
    this.stopButton.addEventListener("click", () => this.stop());
    window.addEventListener("pagehide", () => {
      // The page is going (a reload, say): its streams are cut, but the reply goes on.
      this.unloading = true;
      if (this.turn && !this.turn.done) replyInProgress.remember(this.turn);
    });
    window.addEventListener("pageshow", (event) => {
      if (event.persisted) this.unloading = false;
    });
  }

  /** An empty view for a new conversation. */
  showNew() {
    this.leave();
    this.conversationId = null;
    this.title.textContent = "New chat";
    this.empty.hidden = false;
  }

  /**
   * Show a conversation's messages; they are returned, or null if it could not be read.
   * When `resuming`, a conversation not saved yet (its first reply still running) is no error.
   */
  async open(id, title = "", { resuming = false } = {}) {
    this.leave();
    const opening = ++this.openings;
    this.conversationId = id;
    this.title.textContent = title || "Loading…";
    let history;
    try {
      history = await api.readConversation(id);
    } catch (error) {
      if (opening !== this.openings || error.status === 401) return null;
      if (resuming && error.status === 404) {
        this.title.textContent = title || "New chat";
        return [];
      }
      this.showNew();
      this.notice(error.status === 404 ? "That conversation is no longer there."
        : `The conversation could not be loaded: ${error.message}.`);
      return null;
    }
    if (opening !== this.openings) return null;
    this.title.textContent = history.conversation.title || "Untitled conversation";
    for (const message of history.messages) {
      const view = this.append(message.role === "user" ? "user" : "assistant");
      view.show(message.content);
      if (message.role !== "user") view.note(STATUS_NOTES[message.status] || "");
    }
    this.messages.scrollTop = this.messages.scrollHeight;
    return history.messages;
  }

  /** Show a new title for the open conversation. */
  retitle(conversation) {
    if (conversation.id === this.conversationId) this.title.textContent = conversation.title;
  }

  /** Send what the box holds and stream the reply. */
  async send() {
    const message = this.input.value;
    if (!message.trim() || this.turn) return;
    this.input.value = "";
    this.append("user").show(message);
    if (this.conversationId === null) this.conversationId = newConversationId();
    const turn = this.begin({ conversationId: this.conversationId, message, messagesBefore: this.shownCount - 1 });
    // Remembered before it is sent: the service answers only once the model does, and a reload
    // in between must still find the reply (GET /chat/stream/{id} without Last-Event-ID).
    replyInProgress.remember(turn);
    let stream;
    try {
      stream = await api.startReply(message, turn.conversationId, turn.controller.signal);
    } catch (error) {
      if (this.unloading) return;
      replyInProgress.forget();
      this.end(turn);
      if (error.status === 401 || turn.abandoned) return;
      turn.reply.fail(sentenceFor(error));
      if (this.turn === null && !this.input.value) this.input.value = message;
      return;
    }
    turn.conversationId = stream.conversationId;
    turn.started = true;
    replyInProgress.remember(turn);
    if (turn.stopWanted) this.requestStop(turn);
    await this.follow(turn, stream);
  }

  /** Stop the reply streaming in this view. */
  stop() {
    const turn = this.turn;
    if (!turn) return;
    this.stopButton.disabled = true;
    this.stopButton.textContent = "Stopping…";
    if (turn.started) this.requestStop(turn);
    else turn.stopWanted = true;
  }

  /** Ask the service to stop a turn; the stream then ends with its final event. */
  async requestStop(turn) {
    try {
      await api.stopReply(turn.conversationId);
    } catch (error) {
      if (error.status === 401 || error.code === "no_reply_in_progress") return;
      turn.reply.note(`Could not stop the reply: ${error.message}.`);
      if (this.turn === turn) this.updateComposer();
    }
  }

  /** Pick up a reply that was streaming when the page went away, without repeating its text. */
  async resume(saved) {
    const history = await this.open(saved.conversationId, saved.message, { resuming: true });
    if (!history || alreadySaved(history, saved)) {
      replyInProgress.forget();
      return;
    }
    const last = history[history.length - 1];
    if (!last || last.role !== "user" || last.content !== saved.message) this.append("user").show(saved.message);
    const turn = this.begin({ ...saved, started: true, lastEventId: saved.lastEventId || null });
    turn.text = saved.text || "";
    // Without an event id the page never learnt the turn: what the service replays may be another
    // turn's (it refused this one before answering), so the history has the last word.
    turn.unconfirmed = !turn.lastEventId;
    this.render(turn);
    let stream = null;
    let problem = null;
    try {
      stream = await api.resumeReply(turn.conversationId, turn.lastEventId, turn.controller.signal);
    } catch (error) {
      problem = error;
    }
    if (turn.abandoned) return;
    if (stream) {
      if (!turn.lastEventId) turn.text = "";
      await this.follow(turn, stream);
      return;
    }
    replyInProgress.forget();
    this.end(turn);
    if (problem === null || (turn.unconfirmed && problem.status === 404)) {
      await this.settle(turn);
    } else if (problem.status !== 401) {
      turn.reply.fail("This reply could not be picked up after the page was reloaded"
        + (problem.status === 404 ? "" : ` (${problem.message})`)
        + ". What had arrived is shown; the history keeps what the service saved.");
    }
  }

  /** Read a turn's events to its final one, showing the text as it grows. */
  async follow(turn, stream) {
    let final = null;
    try {
      for await (const events of stream.batches) {
        final = takeEvents(turn, events);
        this.render(turn);
        if (final) break;
        replyInProgress.remember(turn);
      }
    } catch {
      // The connection broke: handled below, like a stream that ended early.
    }
    if (this.unloading || turn.abandoned) return;
    if (final) {
      await this.finish(turn, final);
    } else if (turn.started && (turn.resumes = (turn.resumes || 0) + 1) <= MAX_RESUMES) {
      await this.followAgain(turn);
    } else {
      this.lose(turn);
    }
  }

  /** The stream ended early: resume it after the last event that arrived (from the first, if none did). */
  async followAgain(turn) {
    if (!turn.lastEventId) turn.unconfirmed = true;
    let stream = null;
    try {
      stream = await api.resumeReply(turn.conversationId, turn.lastEventId, turn.controller.signal);
    } catch {
      // Nothing to resume from: the reply is lost as far as this view goes.
    }
    if (stream) await this.follow(turn, stream);
    else this.lose(turn);
  }

  /** The reply ended with its final event: show how, and let the list know. */
  async finish(turn, final) {
    replyInProgress.forget();
    turn.reply.finish(final);
    this.end(turn);
    this.onSaved(final.conversation_id || turn.conversationId);
    if (turn.unconfirmed) await this.confirm(turn);
  }

  /**
   * A reply followed without knowing its turn at first: if the history's last turn is not its
   * message's, the reply shown was another turn's, so the history is shown instead.
   */
  async confirm(turn) {
    let history;
    try {
      ({ messages: history } = await api.readConversation(turn.conversationId));
    } catch {
      return;
    }
    if (!alreadySaved(history, turn) && this.conversationId === turn.conversationId && this.turn === null) {
      await this.settle(turn);
    }
  }

  /** Show the conversation as the history keeps it; a message it does not hold goes back in the box. */
  async settle(turn) {
    const history = await this.open(turn.conversationId, "", { resuming: true });
    if (history === null) return;
    const kept = history.slice(turn.messagesBefore || 0)
      .some((message) => message.role === "user" && message.content === turn.message);
    if (kept) return;
    if (!this.input.value) this.input.value = turn.message;
    this.notice("Your last message was not answered: the page was reloaded before the service took it. "
      + "It is back in the message box, to send again.");
  }

  /** The connection went before the reply finished and it cannot be picked up. */
  lose(turn) {
    replyInProgress.forget();
    this.end(turn);
    turn.reply.fail("The connection was lost before the reply finished. What had arrived is shown.");
  }

  /** Start a turn in this view: its reply placeholder, and the composer in its streaming state. */
  begin(fields) {
    const turn = { text: "", lastEventId: null, started: false, stopWanted: false, done: false,
                   abandoned: false, controller: new AbortController(), ...fields };
    turn.reply = this.append("assistant", true);
    turn.reply.show("");
    this.turn = turn;
    this.running.add(turn);
    this.updateComposer();
    return turn;
  }

  /** A turn is over: the composer sends again (if the view still shows it). */
  end(turn) {
    turn.done = true;
    this.running.delete(turn);
    if (this.turn === turn) {
      this.turn = null;
      this.updateComposer();
    }
  }

  /** Cut every reply this page is reading (on sign-out) and clear the view. */
  abandonAll() {
    for (const turn of this.running) {
      turn.abandoned = true;
      turn.controller.abort();
      this.end(turn);
    }
    this.showNew();
  }

  /** Let a streaming turn go on out of sight, and clear the view. */
  leave() {
    this.turn = null;
    this.updateComposer();
    this.messages.replaceChildren(this.empty);
    this.empty.hidden = true;
    this.shownCount = 0;
  }

  /** Send or Stop, whichever fits, keeping the keyboard focus on the composer. */
  updateComposer() {
    const streaming = this.turn !== null;
    const focused = document.activeElement;
    this.sendButton.hidden = streaming;
    this.stopButton.hidden = !streaming;
    this.stopButton.disabled = false;
    this.stopButton.textContent = "Stop";
    if (focused === this.sendButton && streaming) this.stopButton.focus();
    if (focused === this.stopButton && !streaming) this.input.focus();
  }

  /** Append a message to the view. */
  append(role, live = false) {
    const view = new MessageView(role, live);
    this.empty.hidden = true;
    this.keepScrolled(() => this.messages.append(view.node));
    this.shownCount++;
    return view;
  }

  /** Show a turn's reply text so far. */
  render(turn) {
    this.keepScrolled(() => turn.reply.show(turn.text));
  }

  /** A quiet sentence in the message area. */
  notice(sentence) {
    const paragraph = element("p", "notice");
    paragraph.setAttribute("role", "status");
    paragraph.textContent = sentence;
    this.messages.append(paragraph);
  }

  /** Make a change, staying at the bottom of the messages if the reader was there. */
  keepScrolled(change) {
    const box = this.messages;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 48;
    change();
    if (atBottom) box.scrollTop = box.scrollHeight;
  }
}

/** An event's JSON, or null if it is not JSON. */
function parsed(data) {
  try {
    return JSON.parse(data);
  } catch {
    return null;
  }
}

/** Whether the history already holds the turn a reload interrupted: its message, then a finished reply. */
function alreadySaved(history, saved) {
  const count = history.length;
  return count >= 2 && count >= (saved.messagesBefore || 0) + 2
    && history[count - 1].role === "assistant" && FINISHED.has(history[count - 1].status)
    && history[count - 2].role === "user" && history[count - 2].content === saved.message;
}
