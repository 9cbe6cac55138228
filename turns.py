"""A chat turn: hold the conversation, load its history, ask the model, keep both messages.

A streamed turn runs on its own (a runner reads the model into a `relay.TurnRun`), so it
outlives the connection that asked for it: its readers come and go, and any instance can
replay it from the journal. A turn whose process died is saved by the next request that
finds its journal unfinished.
"""

import datetime
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field

import cache
import sse
from errors import (ApiError, BudgetExceeded, ConversationBusy, DatabaseDown, NotFound, ShuttingDown,
                    TooManyStreams)
from journal import JournalUnavailable, NoJournal
from llm import ContextTooLong, EmptyStream, Reply, estimate_tokens
from metrics import Meter
from models import (Conversation, DatabaseUnavailable, Message, connection, retried_once,
                    save_turn, utcnow)
from redis_link import LocalTrip, scope
from relay import TurnRun

log = logging.getLogger(__name__)

MESSAGE_OVERHEAD_TOKENS = 4
# How often a turn with no reader checks whether one came back, on any instance.
ALONE_CHECK_SECONDS = 0.5


def new_conversation_id():
    """A fresh conversation id."""
    return str(uuid.uuid4())


class ResumeUnavailable(ApiError):
    """The journal cannot be read, so no instance can replay the turn now."""

    status, code = 503, "resume_unavailable"
    message = "the stream cannot be resumed right now (its journal is unavailable); the reply will be in the history"


@dataclass
class Turn:
    """One user message and the reply to it, with what is needed to keep them."""

    user: str
    conversation_id: str
    message: str
    lease: object
    kind: str = "run"
    turn_id: str = ""
    slot: object = None
    name: str = ""
    journaled: bool = False
    record: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    kept: list = field(default_factory=list)  # the history sent to the model
    prompt: list = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    first_token_at: float = None
    reply: str = ""
    status: str = Message.COMPLETE
    model: str = None
    prompt_tokens: int = None
    reply_tokens: int = None
    token_source: str = None  # "model": its own usage; "estimate": counted by the service
    finish_reason: str = None

    def tokens(self):
        """What the turn cost: its prompt and its reply."""
        return (self.prompt_tokens or 0) + (self.reply_tokens or 0)

    def time_to_first_token(self):
        """Seconds from the request to the first chunk, if one came."""
        return None if self.first_token_at is None else self.first_token_at - self.started

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
            "token_source": self.token_source,
            "history_messages": len(self.kept),
        }
        if self.first_token_at is not None:
            metrics["time_to_first_token"] = round(self.first_token_at - self.started, 4)
        return metrics

    def final_data(self, error=None):
        """The `data:` text of the final event, with the error if the turn or its saving failed."""
        final = {"content": "", "is_final": True, "metrics": self.metrics(),
                 "conversation_id": self.conversation_id, "finish_reason": self.finish_reason}
        if error is not None:
            final["error"] = error.body()["error"]
        return sse.data(final)


class ChatService:
    """Runs chat turns against the cache, the coordination between processes, the journal, the database and the model."""

    def __init__(self, model, conversation_cache, coordination, history_limit, system_prompt,
                 heartbeat, context_tokens, round_trip=LocalTrip, max_streams=10, journal=None,
                 grace=20, retain=300, budget=0, meter=None):
        """Wire the service to its model, cache, coordination and journal (`round_trip` makes their round trips).

        A stream with no reader goes on for `grace` seconds; without a shared journal, this
        process keeps an ended turn for resume `retain` seconds.
        """
        self.model = model
        self.cache = conversation_cache
        self.coordination = coordination
        self.journal = journal or NoJournal()
        self.round_trip = round_trip
        self.history_limit = history_limit
        self.system_prompt = system_prompt
        self.heartbeat = heartbeat
        self.max_streams = max_streams
        self.context_tokens = context_tokens
        self.grace = grace
        self.retain = retain
        self.budget = budget
        self.meter = meter or Meter(enabled=False)
        self._runs = {}
        self._ended = {}
        self._listening = False

    def describe_model(self):
        """Where replies come from (never the key)."""
        return self.model.describe()

    # A turn in one piece

    def run(self, user, conversation_id, message, record=None):
        """Answer a turn in one piece and keep it; returns the reply."""
        turn = self.begin(user, conversation_id, message, record, kind="run")
        try:
            reply = self._asked(turn, self.model.complete)
        except BaseException:
            self._abandon(turn)
            raise
        self._take(turn, reply, reply.content)
        run = TurnRun(turn.turn_id, turn.name, conversation_id)
        run.add(sse.chunk_data(turn.reply))  # so a reader who resumes it gets the reply too
        try:
            error = self.finish(turn, run)
        finally:
            turn.let_go()
        if error is not None:
            raise error
        return turn.reply

    # A streamed turn

    def stream(self, user, conversation_id, message, record=None):
        """Start a streamed turn: its SSE events, or ApiError before any event if the model refuses."""
        self.listen_for_stops()
        turn = self.begin(user, conversation_id, message, record, kind="stream")
        try:
            upstream = self._asked(turn, self.model.open_stream)
        except BaseException:
            self._abandon(turn)
            raise
        run = TurnRun(turn.turn_id, turn.name, conversation_id)
        run.upstream = upstream
        self._runs[turn.name] = run
        if turn.journaled:
            self.journal.keep(run)
        # Read the model from the moment it answers, while the response to the client starts.
        threading.Thread(target=self._run, args=(turn, run, upstream), daemon=True).start()
        return self._read(run, 0, turn.slot, wait_for_end=True)

    def _run(self, turn, run, upstream):
        """Relay the model's chunks into the run until the reply ends, then keep the turn and end the run."""
        parts = []
        status, error, upstream = self._relay(turn, run, upstream, parts)
        if run.cut_reason is not None:  # the cut, not what it broke, is how the turn ended
            status, error = {"stopped": (Message.STOPPED, None), "interrupted": (Message.INTERRUPTED, None),
                             "shutting_down": (Message.ERROR, ShuttingDown())}[run.cut_reason]
        turn.status = status
        self._take(turn, upstream.reply if upstream is not None else None, "".join(parts))
        try:
            self.finish(turn, run, error)
        finally:
            self._runs.pop(turn.name, None)
            if not self.journal.shared:
                self._keep_ended(run)
            run.done.set()

    def _relay(self, turn, run, upstream, parts):
        """Add each chunk of the model's reply to the run; (status, error, the stream it came from).

        A stream that sends nothing at all may be the model's way of saying the prompt is too
        long (llama-cpp-python): if so, the oldest history is left out and the model asked again.
        """
        while True:
            try:
                for text in upstream:
                    if turn.first_token_at is None:
                        turn.first_token_at = time.monotonic()
                    parts.append(text)
                    run.add(sse.chunk_data(text))
            except EmptyStream as exc:
                upstream.close()
                try:
                    if parts or run.cut_reason or not self._refit(turn):
                        return Message.ERROR, exc, upstream
                    upstream = run.upstream = self._asked(turn, self.model.open_stream)
                except ApiError as refused:
                    return Message.ERROR, refused, upstream
                continue
            except ApiError as exc:
                upstream.close()
                return Message.ERROR, exc, upstream
            except Exception:
                log.exception("model stream failed")
                upstream.close()
                return Message.ERROR, ApiError(502, "llm_unavailable", "the model's stream failed"), upstream
            upstream.finish()
            return Message.COMPLETE, None, upstream

    def _refit(self, turn):
        """After an empty stream: whether the prompt did not fit and a shorter one is ready.

        Raises ContextTooLong when even the message alone does not fit.
        """
        if self.model.fits(turn.prompt):
            return False
        if not self._shorten(turn):
            raise ContextTooLong()
        return True

    def _read(self, run, after, slot=None, wait_for_end=False):
        """Yield the run's events after event `after` to one reader; when it leaves, see whether anyone is left.

        The turn's own request waits for the turn to end (`wait_for_end`), so its log line says how it ended.
        """
        run.attach()
        self.meter.stream_opened()
        try:
            yield from run.read(after, self.heartbeat)
        finally:
            self.meter.stream_closed()
            if slot is not None:
                slot.release()
            if run.detach():
                self._alone(run)
            if wait_for_end:
                run.done.wait(self.grace + 3600)

    def _alone(self, run):
        """The run's last reader here left: stop the model now (no grace), or once no reader came back in time."""
        if self.grace <= 0:
            self._cut(run, "interrupted")
        else:
            threading.Thread(target=self._wait_for_a_reader, args=(run,), daemon=True).start()

    def _wait_for_a_reader(self, run):
        """Cut the run if no reader, here or on another instance, comes within the grace period."""
        while not run.ended and run.readers == 0 and run.alone_since is not None:
            if time.monotonic() - run.alone_since >= self.grace:
                if not self.coordination.watched(run.turn_id):
                    self._cut(run, "interrupted")
                    return
                run.alone_since = time.monotonic()  # a reader on another instance: wait on
            time.sleep(ALONE_CHECK_SECONDS)

    def _cut(self, run, reason):
        """End the run's model request now, for `reason` (stopped, interrupted, shutting_down)."""
        run.cut(reason)
        run.upstream.cut()

    def _keep_ended(self, run):
        """Keep an ended run in this process for resume (the embedded defaults have no shared journal)."""
        now = time.monotonic()
        self._ended = {name: kept for name, kept in self._ended.items() if kept[1] > now}
        self._ended[run.name] = (run, now + self.retain)

    # Resume

    def resume(self, user, conversation_id, last_event_id=None):
        """The events of the conversation's current or last turn after `last_event_id` ("turn:n"), live
        until the final one; None when there is nothing to send. Raises NotFound, ResumeUnavailable."""
        name = scope(user, conversation_id)
        after_turn, after = last_event_id or (None, 0)
        run = self._runs.get(name) or self._kept_run(name)
        if run is not None:
            after = after if after_turn == run.turn_id else 0
            if run.ended and after >= len(run.framed):
                return None
            return self._read(run, after, self._stream_slot(user))
        try:
            record = self.journal.read(name) if self.journal.shared else None
        except JournalUnavailable:
            raise ResumeUnavailable() from None
        if record is None:
            with connection():
                known = Conversation.state_of(user, conversation_id)[0] is not None
            if not known and self.coordination.holder_of(name) is None:
                raise NotFound()
            return None
        after = after if after_turn == record.turn_id else 0
        if record.final is not None and after >= record.final[0]:
            return None
        return self._follow(user, conversation_id, name, record, after, self._stream_slot(user))

    def _kept_run(self, name):
        """An ended run this process keeps for resume, if it has not expired."""
        kept = self._ended.get(name)
        return kept[0] if kept is not None and kept[1] > time.monotonic() else None

    def _stream_slot(self, user):
        """One of the user's stream slots, or 429."""
        with self.round_trip() as trip:
            opened = self.coordination.open_stream(user, self.max_streams, trip)
        if opened.value is None:
            raise TooManyStreams(self.max_streams)
        return opened.value

    def _follow(self, user, conversation_id, name, record, after, slot):
        """Replay a journaled turn after event `after`, then follow it live until its final event."""
        with self.round_trip() as trip:
            watching = self.coordination.watch(record.turn_id, trip)
        sent, last_ping = after, time.monotonic()
        self.meter.stream_opened()
        try:
            while True:
                if record.gap:
                    yield self._gap_event(record, conversation_id)
                    return
                for number, text in record.events:
                    if number > sent:
                        yield sse.frame(f"{record.turn_id}:{number}", text)
                        sent = number
                if record.final is not None:
                    yield sse.frame(f"{record.turn_id}:{record.final[0]}", record.final[1])
                    return
                entries = self.journal.follow(name, record.last_entry, min(1.0, self.heartbeat))
                if entries:
                    record.take(entries)
                    continue
                if time.monotonic() - last_ping >= self.heartbeat:
                    last_ping = time.monotonic()
                    yield sse.PING
                if self.coordination.holder_of(name) is None:
                    # Nobody runs the turn: its process died. Save it and end its journal, or stop here
                    # if the journal went (the conversation was deleted).
                    self.recover(user, conversation_id)
                    if self.journal.read(name) is None:
                        yield self._gap_event(record, conversation_id, "the turn's journal is gone")
                        return
        except JournalUnavailable:
            yield self._gap_event(record, conversation_id, "the journal became unavailable")
        finally:
            self.meter.stream_closed()
            watching.value.release()
            slot.release()

    @staticmethod
    def _gap_event(record, conversation_id, why="part of this reply was not kept for resuming"):
        """A final event saying the replay cannot go on, and where the reply is."""
        error = ResumeUnavailable(message=f"{why}; read it in /conversations/{conversation_id}")
        final = {"content": "", "is_final": True, "metrics": None, "conversation_id": conversation_id,
                 "finish_reason": "error", "error": error.body()["error"]}
        return sse.frame(f"{record.turn_id}:{record.next_number()}", sse.data(final))

    # Recovery of a turn whose process died

    def recover(self, user, conversation_id):
        """If the conversation's journal holds a turn that never ended and nobody holds the conversation,
        save its user message and partial reply (interrupted) and end its journal."""
        name = scope(user, conversation_id)
        with self.round_trip() as trip:
            taken = self.coordination.take(name, "recover", trip)
        if taken.value is None:
            return
        try:
            self._recover(user, conversation_id, name)
        finally:
            taken.value.release()

    def _recover(self, user, conversation_id, name):
        """Save what the journal holds of an unended turn, once, and end the journal (the caller holds the lease)."""
        record = self.journal.read(name)
        if record is None or record.final is not None:
            return
        reply = self._recovered_reply(record)
        with connection():
            if not Message.turn_saved(record.turn_id):
                save_turn(conversation_id=conversation_id, owner=user, message=record.message, reply=reply,
                          status=Message.INTERRUPTED, message_tokens=estimate_tokens(record.message),
                          reply_tokens=estimate_tokens(reply), turn_id=record.turn_id)
                log.info("kept the turn a stopped process left: %d characters of reply", len(reply))
        final = {"content": "", "is_final": True, "conversation_id": conversation_id,
                 "finish_reason": Message.INTERRUPTED,
                 "metrics": {"token_count": estimate_tokens(reply), "processing_time": None,
                             "prompt_tokens": None, "completion_tokens": estimate_tokens(reply), "model": None}}
        with self.round_trip() as trip:
            self.journal.end(name, record.turn_id, None, (record.next_number(), sse.data(final)), trip)

    @staticmethod
    def _recovered_reply(record):
        """The reply a journal holds: its chunks, up to the first gap."""
        parts = []
        for expected, (number, text) in enumerate(record.events, start=1):
            if number != expected:
                break
            parts.append(sse.content_of(text))
        return "".join(parts)

    # The parts of every turn

    def _asked(self, turn, ask):
        """Ask the model (`complete` or `open_stream`) for the turn; a refusal goes in the request log.

        While the model says the context is too long, the oldest turn of history is left out and
        the model asked again, down to the new message alone.
        """
        while True:
            try:
                return ask(turn.prompt)
            except ContextTooLong as exc:
                if self._shorten(turn):
                    continue
                failure = exc
            except ApiError as exc:
                failure = exc
            turn.record.update(model=getattr(self.model, "model", None), outcome=Message.ERROR,
                               error=failure.code)
            self.meter.turn(turn.kind, Message.ERROR, time.monotonic() - turn.started)
            self.meter.model_error(failure.code)
            raise failure

    def _shorten(self, turn):
        """Leave the oldest turn of history out of the prompt; False if there is none left to leave out."""
        if not turn.kept:
            return False
        turn.kept = turn.kept[1:]
        while turn.kept and turn.kept[0]["role"] == "assistant":
            turn.kept = turn.kept[1:]
        turn.prompt = self._head() + turn.kept + [{"role": "user", "content": turn.message}]
        log.info("the model's context was too long; asking again with %d messages of history", len(turn.kept))
        return True

    def begin(self, user, conversation_id, message, record=None, kind="run"):
        """Hold the conversation, journal the message, load the history (cache, else database).

        The lease, the cached copy, a stream slot and the journal's start ride in one round trip.
        """
        if self._cost(self._head()) + self._cost([{"content": message}]) > self.context_tokens:
            raise ApiError(413, "context_too_large",
                           f"the message alone exceeds the model's context budget of "
                           f"{self.context_tokens} tokens")
        name, turn_id, today = scope(user, conversation_id), secrets.token_hex(8), utcnow().date()
        with self.round_trip() as trip:
            taken = self.coordination.take(name, kind, trip)
            cached = self.cache.read(name, trip)
            opened = self.coordination.open_stream(user, self.max_streams, trip) if kind == "stream" else None
            started = self.journal.start(name, turn_id, message, taken.asked, trip) if taken.asked else None
            spent = self.coordination.spent(user, today, trip) if self.budget else None
        lease, slot = taken.value, opened and opened.value
        if lease is None or (opened and slot is None):
            for held in (lease, slot):
                if held is not None:
                    held.release()
            raise ConversationBusy() if lease is None else TooManyStreams(self.max_streams)
        turn = Turn(user=user, conversation_id=conversation_id, message=message, lease=lease, kind=kind,
                    turn_id=turn_id, slot=slot, name=name, record=record if record is not None else {})
        try:
            turn.journaled = self._journal_started(turn, started)
            if spent is not None:
                self._within_budget(user, today, spent.value)
            turn.history = self._load(user, conversation_id, cached.value)
            turn.kept = self._fitting_history(turn)
            turn.prompt = self._head() + turn.kept + [{"role": "user", "content": message}]
        except BaseException:
            self._abandon(turn)
            raise
        return turn

    def _within_budget(self, user, today, spent):
        """429 budget_exceeded if the user has spent TOKEN_BUDGET_PER_DAY today (a turn begun within it finishes).

        The count is shared in Redis; when it has none for today (a new day, or Redis lost it) it
        starts from the database's sum.
        """
        if spent is None:
            spent = self.coordination.count_spent(user, today, retried_once(
                lambda: Message.spent(user, datetime.datetime.combine(today, datetime.time()),
                                      datetime.datetime.combine(today, datetime.time()) + datetime.timedelta(days=1))))
        if spent >= self.budget:
            raise BudgetExceeded(self.budget)

    def _abandon(self, turn):
        """Let go of a turn that was refused (the client is told): nothing of it is kept, journal included."""
        with self.round_trip() as trip:
            if turn.journaled:
                self.journal.discard(turn.name, trip)
            turn.let_go(trip)

    def _journal_started(self, turn, started):
        """Whether the turn's journal is open; a turn a dead process left is saved first."""
        if started is None:
            return False
        state = started.value
        if state == "unfinished":
            self._recover(turn.user, turn.conversation_id, turn.name)
            with self.round_trip() as trip:
                again = self.journal.start(turn.name, turn.turn_id, turn.message, turn.lease, trip)
            state = again.value
        return state == "started"

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

    def _fitting_history(self, turn):
        """The recent history that fits the budget beside the system prompt and the new message."""
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
        return kept

    def _take(self, turn, reply, content):
        """Copy the model's reply and its figures into the turn."""
        reply = reply or Reply()
        turn.reply = content
        turn.model = reply.model or getattr(self.model, "model", None)
        turn.prompt_tokens = reply.prompt_tokens or self._cost(turn.prompt)
        turn.reply_tokens = reply.completion_tokens if reply.completion_tokens is not None \
            else estimate_tokens(content)
        turn.token_source = "model" if reply.completion_tokens is not None else "estimate"
        turn.finish_reason = (reply.finish_reason if turn.status == Message.COMPLETE
                              else turn.status)
        turn.record.update(turn.log_fields())

    def finish(self, turn, run, error=None):
        """Save both messages, then, in one round trip, refresh the cache, let the next turn in and end the
        journal; then end the run with the final event. Returns the final event's error: the turn's
        own, or a failure to save."""
        try:
            with connection():
                version = save_turn(conversation_id=turn.conversation_id, owner=turn.user,
                                    message=turn.message, reply=turn.reply, status=turn.status,
                                    message_tokens=turn.message_tokens, reply_tokens=turn.reply_tokens,
                                    prompt_tokens=turn.prompt_tokens, turn_id=turn.turn_id, model=turn.model,
                                    token_source=turn.token_source)
        except DatabaseUnavailable:
            version, error = None, error or DatabaseDown()
        if error is not None:
            turn.record["error"] = error.code
        final = turn.final_data(error)
        with self.round_trip() as trip:
            if version is not None:
                history = (turn.history + [{"role": "user", "content": turn.message},
                                           {"role": "assistant", "content": turn.reply}])[-self.history_limit:]
                self.cache.write(turn.name, cache.encode(version, history), trip)
            if turn.journaled:
                self.journal.end(turn.name, turn.turn_id, run, (len(run.framed) + 1, final), trip)
            if self.budget and version is not None:
                self.coordination.spend(turn.user, utcnow().date(), turn.tokens(), trip)
            turn.let_go(trip)
        run.end(final)
        self.meter.turn(turn.kind, turn.status, time.monotonic() - turn.started, turn.time_to_first_token(),
                        turn.model, turn.prompt_tokens, turn.reply_tokens)
        if error is not None and error.code.startswith("llm_"):
            self.meter.model_error(error.code)
        return error

    # Stop and shutdown

    def cut_open_streams(self):
        """End every open stream now with a final error event (the service is shutting down)."""
        for run in list(self._runs.values()):
            self._cut(run, "shutting_down")

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
        """Stop the conversation's stream if this process runs it, with or without a reader."""
        run = self._runs.get(name)
        if run is not None:
            self._cut(run, "stopped")

