// Server-sent events read from a fetch response body, parsed as the WHATWG HTML standard says
// (section "Parsing an event stream"): EventSource cannot send an Authorization header.

/** Turns decoded text into events; keeps the last event id, as a reader resuming a stream needs. */
export class EventStreamParser {
  constructor() {
    this.lastEventId = "";
    this.partial = []; // the pieces of a line whose end has not come yet
    this.afterCR = false; // the last piece ended with a CR, which a LF may follow (one CRLF)
    this.started = false;
    this.data = [];
    this.type = "";
  }

  /**
   * Feed the next piece of text; returns the events it completed. Only the new piece is scanned: a
   * long line that comes in many pieces is kept as pieces until its end, never scanned again.
   */
  push(text) {
    if (!text) return [];
    if (!this.started) {
      this.started = true;
      if (text.startsWith("\uFEFF")) text = text.slice(1); // the stream's one byte order mark
    }
    const events = [];
    let start = this.afterCR && text.startsWith("\n") ? 1 : 0;
    this.afterCR = false;
    for (let i = start; i < text.length; i++) {
      const char = text[i];
      if (char !== "\n" && char !== "\r") continue;
      this.partial.push(text.slice(start, i));
      const event = this.line(this.partial.join(""));
      this.partial = [];
      if (event) events.push(event);
      if (char === "\r") {
        if (i + 1 === text.length) this.afterCR = true;
        else if (text[i + 1] === "\n") i++;
      }
      start = i + 1;
    }
    if (start < text.length) this.partial.push(text.slice(start));
    return events;
  }

  /** The stream ended: an unfinished line and event are dropped. */
  end() {
    this.partial = [];
    this.afterCR = false;
    this.data = [];
    this.type = "";
    return [];
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
  const decoder = new TextDecoder("utf-8", { ignoreBOM: true }); // the parser drops the one BOM
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
