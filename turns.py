"""A chat turn: hold the conversation, load its history, ask the model, keep both messages."""

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field

import cache
import sse
from errors import (ApiError, ConversationBusy, DatabaseDown, NotFound, ShuttingDown,
                    TooManyStreams)
from llm import estimate_tokens
from models import (Conversation, DatabaseUnavailable, Message, connection, retried_once,
                    save_turn)
from redis_link import LocalTrip, scope

log = logging.getLogger(__name__)

MESSAGE_OVERHEAD_TOKENS = 4


def new_conversation_id():
    """A fresh conversation id."""
    return str(uuid.uuid4())


@dataclass
class Turn:
    """One user message and the reply to it, with what is needed to keep them."""

    user: str
    conversation_id: str
    message: str
    lease: object
    slot: object = None
    name: str = ""
    record: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    prompt: list = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float = None
    reply: str = ""
    status: str = Message.COMPLETE
    model: str = None
    prompt_tokens: int = None
    reply_tokens: int = None
    finish_reason: str = None

    def let_go(self, trip=None):
        """Release the conversation and the stream slot (each once), in `trip` if given."""
        self.lease.release(trip)
        if self.slot is not None:
            self.slot.release(trip)

    @property
    def message_tokens(self):
        """The estimated size of the user message in tokens."""
        return estimate_tokens(self.message)

    def log_fields(self):
        """What the request log says of the turn (never its text)."""
        fields = {"model": self.model, "prompt_tokens": self.prompt_tokens,
                  "completion_tokens": self.reply_tokens, "outcome": self.status}
        if self.first_token_at is not None:
            fields["time_to_first_token"] = round(self.first_token_at - self.started, 4)
        return fields

    def metrics(self):
        """The figures of the finished turn, for the final event."""
        metrics = {
            "token_count": self.reply_tokens,
            "processing_time": round(time.monotonic() - self.started, 4),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.reply_tokens,
            "model": self.model,
        }
        if self.first_token_at is not None:
            metrics["time_to_first_token"] = round(self.first_token_at - self.started, 4)
        return metrics


class ChatService:
    """Runs chat turns against the cache, the coordination between processes, the database and the model."""

    def __init__(self, model, conversation_cache, coordination, history_limit, system_prompt,
                 heartbeat, context_tokens, round_trip=LocalTrip, max_streams=10):
        """Wire the service to its model, cache and coordination (`round_trip` makes their round trips)."""
        self.model = model
        self.cache = conversation_cache
        self.coordination = coordination
        self.round_trip = round_trip
        self.history_limit = history_limit
        self.system_prompt = system_prompt
        self.heartbeat = heartbeat
        self.max_streams = max_streams
        self.context_tokens = context_tokens
        self._open_streams = {}
        self._listening = False

    def describe_model(self):
        """Where replies come from (never the key)."""
        return self.model.describe()

    def run(self, user, conversation_id, message, record=None):
        """Answer a turn in one piece and keep it; returns the reply."""
        turn = self.begin(user, conversation_id, message, record, kind="run")
        try:
            reply = self._asked(turn, self.model.complete)
            self._take(turn, reply, reply.content)
            self.finish(turn)
            return turn.reply
        finally:
            turn.let_go()

    def stream(self, user, conversation_id, message, record=None):
        """Start a streamed turn: the SSE events, or ApiError before any event if the model refuses."""
        self.listen_for_stops()
        turn = self.begin(user, conversation_id, message, record, kind="stream")
        try:
            upstream = self._asked(turn, self.model.open_stream)
        except BaseException:
            turn.let_go()
            raise
        # Read the model from the moment it answers, while the response to the client starts.
        chunks = queue.Queue()
        threading.Thread(target=pump, args=(upstream, chunks), daemon=True).start()
        return self._events(turn, upstream, chunks)

    def _asked(self, turn, ask):
        """Ask the model (`complete` or `open_stream`) for the turn; a refusal goes in the request log."""
        try:
            return ask(turn.prompt)
        except ApiError as exc:
            turn.record.update(model=getattr(self.model, "model", None), outcome=Message.ERROR,
                               error=exc.code)
            raise

    def begin(self, user, conversation_id, message, record=None, kind="run"):
        """Hold the conversation, load its history (cache, else database) and check the owner."""
        if self._cost(self._head()) + self._cost([{"content": message}]) > self.context_tokens:
            raise ApiError(413, "context_too_large",
                           f"the message alone exceeds the model's context budget of "
                           f"{self.context_tokens} tokens")
        name = scope(user, conversation_id)
        with self.round_trip() as trip:
            taken = self.coordination.take(name, kind, trip)
            cached = self.cache.read(name, trip)
            opened = self.coordination.open_stream(user, self.max_streams, trip) if kind == "stream" else None
        lease, slot = taken.value, opened and opened.value
        if lease is None or (opened and slot is None):
            for held in (lease, slot):
                if held is not None:
                    held.release()
            raise ConversationBusy() if lease is None else TooManyStreams(self.max_streams)
        turn = Turn(user=user, conversation_id=conversation_id, message=message, lease=lease,
                    slot=slot, name=name, record=record if record is not None else {})
        try:
            turn.history = self._load(user, conversation_id, cached.value)
            turn.prompt = self._prompt(turn)
        except BaseException:
            turn.let_go()
            raise
        return turn

    def _load(self, user, conversation_id, raw):
        """The recent messages of the user's conversation: the cached ones (`raw`) if they are the database's."""
        cached = None if raw is None else cache.decode(raw)
        return retried_once(lambda: self._stored(user, conversation_id, cached))

    def _stored(self, user, conversation_id, cached):
        """The recent messages from the database, or from `cached` if it is current."""
        key, version = Conversation.state_of(user, conversation_id)
        if key is None:
            return []
        if cached is not None and cached[0] == version:
            return cached[1]
        return Message.recent(key, self.history_limit)

    def _head(self):
        """The system prompt, as the first messages of every request."""
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    @staticmethod
    def _cost(messages):
        """The estimated tokens of messages, with a few for each message's framing."""
        return sum(estimate_tokens(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in messages)

    def _prompt(self, turn):
        """The messages sent to the model: system prompt, the recent history that fits the budget, the new message."""
        head, new = self._head(), [{"role": "user", "content": turn.message}]
        room = self.context_tokens - self._cost(head) - self._cost(new)
        kept = []
        for message in reversed([m for m in turn.history if m["content"]]):
            room -= self._cost([message])
            if room < 0:
                break
            kept.append(message)
        kept.reverse()
        while kept and kept[0]["role"] == "assistant":
            kept.pop(0)  # a reply without the message it answered is a turn cut in half
        return head + kept + new

    def _events(self, turn, upstream, chunks):
        """Yield the SSE events of the turn: chunks, pings while the model is silent, one final event."""
        self._open_streams[turn.name] = chunks
        parts = []
        try:
            try:
                status, error = yield from self._relay(turn, chunks, parts)
            except GeneratorExit:
                upstream.cut()
                self._keep_interrupted(turn, upstream.reply, "".join(parts))
                raise
            finally:
                self._open_streams.pop(turn.name, None)
            if status != Message.COMPLETE:
                upstream.cut()
            turn.status = status
            self._take(turn, upstream.reply, "".join(parts))
            yield self._final_event(turn, error)
        finally:
            turn.let_go()

    def _relay(self, turn, chunks, parts):
        """Yield a chunk event per piece of text and a ping per silent heartbeat; return (status, error)."""
        while True:
            try:
                kind, value = chunks.get(timeout=self.heartbeat)
            except queue.Empty:
                kind, value = "ping", None
            if kind == "ping":
                yield sse.PING
                continue
            if kind == "stop":
                return Message.STOPPED, None
            if kind == "error":
                return Message.ERROR, value
            if kind == "done":
                return Message.COMPLETE, None
            if turn.first_token_at is None:
                turn.first_token_at = time.monotonic()
            parts.append(value)
            yield sse.chunk(value)

    def _final_event(self, turn, error):
        """Keep the turn and frame the final event, with an error if the turn or its saving failed."""
        try:
            self.finish(turn)
        except ApiError as exc:
            error = error or exc
        except DatabaseUnavailable:
            error = error or DatabaseDown()
        final = {"content": "", "is_final": True, "metrics": turn.metrics(),
                 "conversation_id": turn.conversation_id, "finish_reason": turn.finish_reason}
        if error is not None:
            final["error"] = error.body()["error"]
            turn.record["error"] = error.code
        return sse.event(final)

    def _keep_interrupted(self, turn, reply, content):
        """Keep the turn of a client that left; nobody is left to tell if that fails."""
        turn.status = Message.INTERRUPTED
        self._take(turn, reply, content)
        try:
            self.finish(turn)
        except (ApiError, DatabaseUnavailable) as exc:
            log.error("could not keep interrupted turn: %s", type(exc).__name__)

    def _take(self, turn, reply, content):
        """Copy the model's reply and its figures into the turn."""
        turn.reply = content
        turn.model = reply.model or getattr(self.model, "model", None)
        turn.prompt_tokens = reply.prompt_tokens or self._cost(turn.prompt)
        turn.reply_tokens = reply.completion_tokens if reply.completion_tokens is not None \
            else estimate_tokens(content)
        turn.finish_reason = (reply.finish_reason if turn.status == Message.COMPLETE
                              else turn.status)
        turn.record.update(turn.log_fields())

    def finish(self, turn):
        """Save both messages in the database, then refresh the cache and let the next turn in."""
        with connection():
            version = save_turn(conversation_id=turn.conversation_id, owner=turn.user,
                                message=turn.message, reply=turn.reply, status=turn.status,
                                message_tokens=turn.message_tokens, reply_tokens=turn.reply_tokens,
                                prompt_tokens=turn.prompt_tokens)
        history = (turn.history + [
            {"role": "user", "content": turn.message},
            {"role": "assistant", "content": turn.reply},
        ])[-self.history_limit:]
        with self.round_trip() as trip:
            self.cache.write(turn.name, cache.encode(version, history), trip)
            turn.let_go(trip)

    def cut_open_streams(self):
        """End every open stream now with a final error event (the service is shutting down)."""
        for chunks in list(self._open_streams.values()):
            chunks.put(("error", ShuttingDown()))

    def stop(self, user, conversation_id):
        """Stop the reply being streamed for the user's conversation, from whichever process streams it."""
        name = scope(user, conversation_id)
        kind = self.coordination.holder_of(name)
        if kind != "stream":
            with connection():
                key, _ = Conversation.state_of(user, conversation_id)
            # A conversation's first turn is not in the database yet, but its lease is held.
            if key is None and kind is None:
                raise NotFound()
            raise ApiError(409, "no_reply_in_progress", "no reply is being streamed for this conversation")
        self.coordination.publish_stop(name)

    def listen_for_stops(self):
        """Start receiving stop signals in this process (once, after gunicorn has forked)."""
        if not self._listening:
            self._listening = True
            self.coordination.listen_for_stops(self._stop_here)

    def _stop_here(self, name):
        """Stop the conversation's stream if this process serves it."""
        chunks = self._open_streams.get(name)
        if chunks is not None:
            chunks.put(("stop", None))


def pump(upstream, chunks):
    """Move the model's chunks into a queue, ending with ("done", None) or ("error", ApiError)."""
    try:
        for text in upstream:
            chunks.put(("chunk", text))
    except ApiError as exc:
        upstream.close()
        chunks.put(("error", exc))
    except Exception:
        log.exception("model stream failed")
        upstream.close()
        chunks.put(("error", ApiError(502, "llm_unavailable", "the model's stream failed")))
    else:
        chunks.put(("done", None))
        upstream.finish()
