// Server-sent events read from a fetch response body, parsed as the WHATWG HTML standard says
// (section "Parsing an event stream"): EventSource cannot send an Authorization header.

/** Turns decoded text into events; keeps the last event id, as a reader resuming a stream needs. */
export class EventStreamParser {
  constructor() {
    this.lastEventId = "";
    this.pending = "";
    this.data = [];
    this.type = "";
  }

  /** Feed the next piece of text; returns the events it completed. */
  push(text) {
    const buffer = this.pending + text;
    const events = [];
    let start = 0;
    for (let i = 0; i < buffer.length; i++) {
      const char = buffer[i];
      if (char !== "\n" && char !== "\r") continue;
      // A CR at the end of the text may be the first half of a CRLF: wait for what follows.
      if (char === "\r" && i + 1 === buffer.length) break;
      const event = this.line(buffer.slice(start, i));
      if (event) events.push(event);
      if (char === "\r" && buffer[i + 1] === "\n") i++;
      start = i + 1;
    }
    this.pending = buffer.slice(start);
    return events;
  }

  /** The stream ended: a last CR still ends its line, and an unfinished event is dropped. */
  end() {
    const events = this.pending.endsWith("\r") ? this.push("\n") : [];
    this.pending = "";
    this.data = [];
    this.type = "";
    return events;
  }

  /** Process one line; returns the event a blank line completes, else null. */
  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    return null;
  }

  /** The event the buffers hold, if any data came, and empty buffers for the next one. */
  dispatch() {
    const data = this.data;
    const type = this.type || "message";
    this.data = [];
    this.type = "";
    if (data.length === 0) return null;
    return { type, data: data.join("\n"), lastEventId: this.lastEventId };
  }
}

/**
 * The events of a response body, a batch for each piece the network delivered, so a caller
 * can render (and remember) once per piece rather than once per event.
 */
export async function* eventBatches(body, parser = new EventStreamParser()) {
  const reader = body.getReader();
  const decoder = new TextDecoder("utf-8");
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      const events = parser.push(decoder.decode(value, { stream: true }));
      if (events.length) yield events;
    }
    finished = true;
    const events = [...parser.push(decoder.decode()), ...parser.end()];
    if (events.length) yield events;
  } finally {
    if (!finished) reader.cancel().catch(() => {});
  }
}
