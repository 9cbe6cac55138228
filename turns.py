"""A chat turn: hold the conversation, load its history, ask the model, keep both messages.

A streamed turn runs on its own (a runner reads the model into a `relay.Feed`), so it outlives
the connection that asked for it: its readers come and go, and any instance can replay it from
the journal (resume.py). A turn whose process died is saved by the next request that finds its
journal unfinished.
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
from cache import ConversationCache
from coordination import Coordination, lease_key, lease_token
from errors import (ApiError, BudgetExceeded, ContextTooLarge, ConversationBusy, DatabaseDown, EmptyStream,
                    NoReplyInProgress, NotFound, RecoveryUnavailable, ShuttingDown, TooManyStreams, TurnTakenOver)
from journal import Journal, JournalUnavailable, NoJournal
from llm import Reply, estimate_tokens
from metrics import Meter
from models import Conversation, DatabaseUnavailable, Message, connection, retried_once, save_turn, utcnow
from redis_link import LocalTrip, scope
from relay import Body, Feed

log = logging.getLogger(__name__)

MESSAGE_OVERHEAD_TOKENS = 4
# How often a turn with no reader checks whether one came back, on any instance.
ALONE_CHECK_SECONDS = 0.5
# How a cut turn is saved, and the kind of error its final event carries (built for each turn).
CUTS = {"stopped": (Message.STOPPED, None), "interrupted": (Message.INTERRUPTED, None),
        "shutting_down": (Message.ERROR, ShuttingDown)}


def new_conversation_id():
    """A fresh conversation id."""
    return str(uuid.uuid4())


@dataclass
class TurnSettings:
    """How turns are run: the settings of config.py that ChatService reads."""

    history_limit: int = 20
    system_prompt: str = None
    heartbeat: float = 10
    context_tokens: int = 16000
    max_streams: int = 10
    grace: float = 20
    retain: float = 300
    budget: int = 0

    @classmethod
    def of(cls, config):
        """The settings in an app's config."""
        return cls(history_limit=config["CHAT_HISTORY_LIMIT"], system_prompt=config["LLM_SYSTEM_PROMPT"],
                   heartbeat=config["SSE_HEARTBEAT_SECONDS"], context_tokens=config["LLM_CONTEXT_TOKENS"],
                   max_streams=config["MAX_STREAMS_PER_USER"], grace=config["STREAM_RESUME_GRACE_SECONDS"],
                   retain=config["STREAM_RETAIN_SECONDS"], budget=config["TOKEN_BUDGET_PER_DAY"])


@dataclass
class Shared:
    """What the processes share: the conversation cache, their coordination, the journal, and how to send
    several of their commands in one round trip."""

    cache: ConversationCache
    coordination: Coordination
    journal: Journal = field(default_factory=NoJournal)
    round_trip: object = LocalTrip


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
    journal_start: str = None  # the journal's entry id of the turn's start, once journaled
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

    def release(self, trip=None):
        """Let go of the conversation and the stream slot (each once), in `trip` if given."""
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
        metrics = final_metrics(token_count=self.reply_tokens, processing_time=round(time.monotonic() - self.started, 4),
                                prompt_tokens=self.prompt_tokens, model=self.model, token_source=self.token_source,
                                history_messages=len(self.kept))
        if self.first_token_at is not None:
            metrics["time_to_first_token"] = round(self.first_token_at - self.started, 4)
        return metrics

    def final_data(self, error=None):
        """The `data:` text of the final event, with the error if the turn or its saving failed."""
        return final_data(self.conversation_id, self.finish_reason, self.metrics(), error)


def final_metrics(token_count=None, processing_time=None, prompt_tokens=None, model=None, token_source=None,
                  history_messages=None):
    """The metrics of a final event, every key present (None where a figure is not known)."""
    return {"token_count": token_count, "processing_time": processing_time, "prompt_tokens": prompt_tokens,
            "completion_tokens": token_count, "model": model, "token_source": token_source,
            "history_messages": history_messages}


def final_data(conversation_id, finish_reason, metrics, error=None):
    """The `data:` text of a final event: the one shape every turn ends with."""
    final = {"content": "", "is_final": True, "metrics": metrics, "conversation_id": conversation_id,
             "finish_reason": finish_reason}
    if error is not None:
        final["error"] = error.body()["error"]
    return sse.data(final)


class ChatService:
    """Runs chat turns against what the processes share, the database and the model."""

    def __init__(self, model, shared, settings=None, meter=None):
        """Wire the service to its model and to `shared` (a Shared), run by `settings` (a TurnSettings)."""
        self.model = model
        self.shared = shared
        self.cache, self.coordination, self.journal = shared.cache, shared.coordination, shared.journal
        self.round_trip = shared.round_trip
        self.settings = settings or TurnSettings()
        self.meter = meter or Meter(enabled=False)
        self.feeds = {}  # the streamed turns this process runs, by conversation
        self.ended = {}  # without a shared journal: ended feeds kept for resume, by conversation
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
        except BaseException as exc:
            self._refused(turn, exc)
            raise
        self._take(turn, reply, reply.content)
        feed = Feed(turn.turn_id, turn.name, conversation_id)
        feed.add(sse.chunk_data(turn.reply))  # so a reader who resumes it gets the reply too
        try:
            error = self.finish(turn, feed)
        finally:
            turn.release()
        if not self.journal.shared:
            self._keep_ended(feed)
        if error is not None:
            raise error
        return turn.reply

    # A streamed turn

    def stream(self, user, conversation_id, message, record=None):
        """Start a streamed turn: its SSE body, or ApiError before any event if the model refuses."""
        self.listen_for_stops()
        turn = self.begin(user, conversation_id, message, record, kind="stream")
        feed = self.feeds[turn.name] = Feed(turn.turn_id, turn.name, conversation_id)  # a stop may come now
        try:
            upstream = feed.upstream = self._asked(turn, self.model.open_stream)
            if feed.cut_reason is not None:
                upstream.cut()  # stopped while the model was being asked
            if turn.journal_start:
                self.journal.keep(feed, *self._lease_of(turn))
            # Read the model from the moment it answers, while the response to the client starts.
            threading.Thread(target=self._relay_reply, args=(turn, feed, upstream), daemon=True).start()
        except BaseException as exc:
            self._never_ran(turn, feed, exc)
            raise
        return self.reader(feed, 0, wait_for_end=True)

    def _never_ran(self, turn, feed, failure):
        """The model refused the streamed turn, or its runner could not start: let go of all of it."""
        self.feeds.pop(turn.name, None)
        # A reader who resumed while the model was asked hears why the turn never ran (the journal's writer
        # lets go of an ended feed).
        error = failure if isinstance(failure, ApiError) else ApiError()
        feed.end(final_data(turn.conversation_id, Message.ERROR, final_metrics(), error))
        feed.done.set()
        if feed.upstream is not None:
            feed.upstream.close()
        self._refused(turn, failure)

    def _relay_reply(self, turn, feed, upstream):
        """The runner: relay the model's chunks into the feed until the reply ends, then keep the turn."""
        parts = []
        try:
            status, error, upstream = self._read_model(turn, feed, upstream, parts)
            if feed.cut_reason is not None:  # the cut, not what it broke, is how the turn ended
                status, kind = CUTS[feed.cut_reason]
                error = kind and kind()
            turn.status = status
            self._take(turn, upstream.reply, "".join(parts))
            self.finish(turn, feed, error)
        except Exception:  # noqa: BLE001 - a bug here must still end the feed and free the conversation
            log.exception("a streamed turn failed")
            if not feed.ended:
                feed.end(final_data(turn.conversation_id, Message.ERROR, final_metrics(), ApiError()))
            turn.release()
        finally:
            if self.feeds.get(turn.name) is feed:
                del self.feeds[turn.name]
            if not self.journal.shared:
                self._keep_ended(feed)
            feed.done.set()

    def _read_model(self, turn, feed, upstream, parts):
        """Add each chunk of the model's reply to the feed; (status, error, the stream it came from).

        A stream that says, before any text, that the prompt is too long, or that sends nothing
        at all (llama-cpp-python's way of saying so), is asked again with the oldest history left out.
        """
        while True:
            try:
                for text in upstream:
                    if turn.first_token_at is None:
                        turn.first_token_at = time.monotonic()
                    parts.append(text)
                    feed.add(sse.chunk_data(text))
            except (EmptyStream, ContextTooLarge) as exc:
                upstream.close()
                try:
                    if parts or feed.cut_reason or not self._refit(turn, exc):
                        return Message.ERROR, exc, upstream
                    upstream = feed.upstream = self._asked(turn, self.model.open_stream)
                except ApiError as refused:
                    return Message.ERROR, refused, upstream
                if feed.cut_reason is not None:
                    upstream.cut()  # stopped, left or shut down while the model was asked again
                continue
            except ApiError as exc:
                upstream.close()
                return Message.ERROR, exc, upstream
            except Exception:
                log.exception("the model's stream failed")
                upstream.close()
                return Message.ERROR, ApiError(502, "llm_unavailable", "the model's stream failed"), upstream
            upstream.finish()
            return Message.COMPLETE, None, upstream

    def _refit(self, turn, failure):
        """After an empty stream or one that said the prompt is too long: whether a shorter prompt is ready.

        An empty stream may have another cause: the model is asked, for one token, whether the
        prompt fits. Raises ContextTooLarge when even the message alone does not fit.
        """
        if isinstance(failure, EmptyStream) and self.model.fits(turn.prompt):
            return False
        if not self._shorten(turn):
            raise ContextTooLarge()
        return True

    def reader(self, feed, after, release=None, wait_for_end=False):
        """The body of one reader of the feed, from after event `after`; `release()` when it is closed.

        When the last reader here leaves, the turn waits for another (see _alone). The turn's own
        request waits for the turn to end (`wait_for_end`), so its log line says how it ended.
        """
        feed.attach()
        self.meter.stream_opened()

        def leave():
            """The reader is gone."""
            self.meter.stream_closed()
            if release is not None:
                release()
            if feed.detach():
                self._alone(feed)
            if wait_for_end:
                feed.done.wait(self.settings.grace + 3600)

        return Body(feed.read(after, self.settings.heartbeat), leave)

    def _alone(self, feed):
        """The feed's last reader here left: stop the model now (no grace), or once no reader came back in time."""
        if self.settings.grace <= 0:
            feed.cut("interrupted")
        else:
            threading.Thread(target=self._wait_for_a_reader, args=(feed,), daemon=True).start()

    def _wait_for_a_reader(self, feed):
        """Cut the feed once it has had no reader, here or on another instance, for the whole grace period.

        A reader on another instance is seen in Redis while it reads: the grace starts again when it leaves.
        """
        read_elsewhere = 0.0
        while not feed.ended and feed.readers == 0 and feed.alone_since is not None:
            if self.coordination.watched(feed.turn_id):
                read_elsewhere = time.monotonic()
            # Checked again after the call to Redis: a reader here may have come meanwhile.
            elif feed.readers == 0 and feed.alone_since is not None \
                    and time.monotonic() - max(feed.alone_since, read_elsewhere) >= self.settings.grace:
                feed.cut("interrupted")
                return
            time.sleep(ALONE_CHECK_SECONDS)

    def _keep_ended(self, feed):
        """Keep an ended feed in this process for resume (the embedded defaults have no shared journal)."""
        now = time.monotonic()
        self.ended = {name: kept for name, kept in self.ended.items() if kept[1] > now}
        self.ended[feed.name] = (feed, now + self.settings.retain)

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

    def recover_if_left(self, user, conversation_id):
        """Save the turn a process that died left in the conversation, if there is one (one round trip to find out,
        only with a shared journal); if Redis fails meanwhile, the history is shown without it."""
        if not self.journal.shared:
            return
        name = scope(user, conversation_id)
        with self.round_trip() as trip:
            left = self.journal.left_by_the_dead(name, lease_key(name), trip)
        if left.value:
            try:
                self.recover(user, conversation_id)
            except JournalUnavailable:
                log.warning("could not save the turn a stopped process left: its journal is unavailable")

    def _recover(self, user, conversation_id, name):
        """Save what the journal holds of an unended turn, once, and end the journal (the caller holds the lease)."""
        record = self.journal.read(name)
        if record is None or record.final is not None:
            return
        reply = recovered_reply(record)
        with connection():
            status = Message.saved_status(record.turn_id)
            if status is None:
                status = Message.INTERRUPTED
                save_turn(conversation_id=conversation_id, owner=user, message=record.message, reply=reply,
                          status=status, message_tokens=estimate_tokens(record.message),
                          reply_tokens=estimate_tokens(reply), turn_id=record.turn_id, token_source="estimate")
                log.info("kept the turn a stopped process left: %d characters of reply", len(reply))
        metrics = final_metrics(token_count=estimate_tokens(reply), token_source="estimate")
        final = (record.next_number(), final_data(conversation_id, status, metrics))
        with self.round_trip() as trip:
            self.journal.end(name, record.turn_id, None, final, trip)
            if self.settings.budget:
                self.coordination.spend(user, utcnow().date(), estimate_tokens(reply), trip)

    # The parts of every turn

    def _asked(self, turn, ask):
        """Ask the model (`complete` or `open_stream`) for the turn; a refusal goes in the request log.

        While the model says the context is too long, the oldest turn of history is left out and
        the model asked again, down to the new message alone.
        """
        while True:
            try:
                return ask(turn.prompt)
            except ContextTooLarge as exc:
                if self._shorten(turn):
                    continue
                failure = exc
            except ApiError as exc:
                failure = exc
            turn.record.update(model=getattr(self.model, "model", None), outcome=Message.ERROR,
                               error=failure.code)
            raise failure

    def _refused(self, turn, failure):
        """The model refused the turn before it began: count it, and keep nothing of it."""
        if isinstance(failure, ApiError):
            self.meter.turn(turn.kind, Message.ERROR, time.monotonic() - turn.started)
            self.meter.model_error(failure.code)
        self._abandon(turn)

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

        The lease, the cached copy, a stream slot, the tokens spent today and the journal's start
        ride in one round trip.
        """
        if self._cost(self._head()) + self._cost([{"content": message}]) > self.settings.context_tokens:
            raise ContextTooLarge(message=f"the message alone exceeds the model's context budget of "
                                          f"{self.settings.context_tokens} tokens")
        turn = Turn(user=user, conversation_id=conversation_id, message=message, lease=None, kind=kind,
                    turn_id=secrets.token_hex(8), name=scope(user, conversation_id),
                    record=record if record is not None else {})
        today = utcnow().date()
        with self.round_trip() as trip:
            taken = self.coordination.take(turn.name, kind, trip, token=turn.turn_id)
            cached = self.cache.read(turn.name, trip)
            opened = self.coordination.open_stream(user, self.settings.max_streams, trip) if kind == "stream" \
                else None
            started = self.journal.start(turn.name, turn.turn_id, message, *self._lease_of(turn), trip)
            spent = self.coordination.spent(user, today, trip) if self.settings.budget else None
        turn.lease, turn.slot = taken.value, opened and opened.value
        try:
            if turn.lease is None:
                raise ConversationBusy()
            if opened is not None and turn.slot is None:
                raise TooManyStreams(self.settings.max_streams)
            turn.journal_start = self._journal_started(turn, started)
            if spent is not None:
                self._within_budget(user, today, spent.value)
            turn.history = self._load(user, conversation_id, cached.value)
            turn.kept = self._fitting_history(turn)
            turn.prompt = self._head() + turn.kept + [{"role": "user", "content": message}]
        except BaseException:
            self._abandon(turn, started)
            raise
        return turn

    @staticmethod
    def _lease_of(turn):
        """(key, token) of the lease the turn asks for, so the journal can check it is the turn's."""
        return lease_key(turn.name), lease_token(turn.turn_id, turn.kind)

    def _within_budget(self, user, today, spent):
        """429 budget_exceeded if the user has spent TOKEN_BUDGET_PER_DAY today (a turn begun within it finishes).

        The count is shared in Redis; when it has none for today (a new day, or Redis lost it) it
        starts from the database's sum.
        """
        if spent is None:
            start = datetime.datetime.combine(today, datetime.time())
            spent = self.coordination.count_spent(user, today, retried_once(
                lambda: Message.spent(user, start, start + datetime.timedelta(days=1))))
        if spent >= self.settings.budget:
            raise BudgetExceeded(self.settings.budget)

    def _abandon(self, turn, started=None):
        """Let go of a turn that was refused (the client is told): nothing of it is kept, journal included."""
        with self.round_trip() as trip:
            if turn.journal_start or journal_id(started.value if started is not None else None):
                self.journal.abandon(turn.name, turn.turn_id, trip)
            for held in (turn.lease, turn.slot):
                if held is not None:
                    held.release(trip)

    def _journal_started(self, turn, started):
        """The journal's id of the turn's start entry, or None if it is not journaled; a turn a dead process
        left is saved first (503 if its journal cannot be read: the turns would be kept out of order)."""
        state = started.value if started is not None else None
        if state == "unfinished":
            try:
                self._recover(turn.user, turn.conversation_id, turn.name)
            except JournalUnavailable:
                raise RecoveryUnavailable() from None
            with self.round_trip() as trip:
                again = self.journal.start(turn.name, turn.turn_id, turn.message, *self._lease_of(turn), trip)
            state = again.value
        return journal_id(state)

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
        return Message.recent(key, self.settings.history_limit)

    def _head(self):
        """The system prompt, as the first messages of every request."""
        prompt = self.settings.system_prompt
        return [{"role": "system", "content": prompt}] if prompt else []

    @staticmethod
    def _cost(messages):
        """The estimated tokens of messages, with a few for each message's framing."""
        return sum(estimate_tokens(m["content"]) + MESSAGE_OVERHEAD_TOKENS for m in messages)

    def _fitting_history(self, turn):
        """The recent history that fits the budget beside the system prompt and the new message."""
        head, new = self._head(), [{"role": "user", "content": turn.message}]
        room = self.settings.context_tokens - self._cost(head) - self._cost(new)
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
        turn.token_source = "model" if reply.prompt_tokens and reply.completion_tokens is not None else "estimate"
        turn.finish_reason = (reply.finish_reason if turn.status == Message.COMPLETE
                              else turn.status)
        turn.record.update(turn.log_fields())

    def finish(self, turn, feed, error=None):
        """Keep the turn, let the next one in, and end the feed with the final event; the final event's error
        (the turn's own, or a failure to keep it)."""
        version, error = self._save(turn, error)
        if error is not None:
            turn.record["error"] = error.code
        final = turn.final_data(error)
        self._after_save(turn, feed, version, final, kept=not isinstance(error, TurnTakenOver))
        feed.end(final)
        self.meter.turn(turn.kind, turn.status, time.monotonic() - turn.started, turn.time_to_first_token(),
                        turn.model, turn.prompt_tokens, turn.reply_tokens)
        if error is not None and error.code.startswith("llm_"):
            self.meter.model_error(error.code)
        return error

    def _save(self, turn, error):
        """Save both messages: (the conversation's new version or None, the final event's error)."""
        try:
            with connection():
                version = save_turn(conversation_id=turn.conversation_id, owner=turn.user, message=turn.message,
                                    reply=turn.reply, status=turn.status, message_tokens=turn.message_tokens,
                                    reply_tokens=turn.reply_tokens, prompt_tokens=turn.prompt_tokens,
                                    turn_id=turn.turn_id, model=turn.model, token_source=turn.token_source)
        except DatabaseUnavailable:
            return None, error or DatabaseDown()
        if version is None:  # saved already: this process stalled past its lease, and another kept the turn
            return None, TurnTakenOver()
        return version, error

    def _after_save(self, turn, feed, version, final, kept=True):
        """In one round trip: refresh the cache, end the journal, count the tokens, let the next turn in."""
        with self.round_trip() as trip:
            if version is not None:
                history = (turn.history + [{"role": "user", "content": turn.message},
                                           {"role": "assistant", "content": turn.reply}])
                self.cache.write(turn.name, cache.encode(version, history[-self.settings.history_limit:]), trip)
            if turn.journal_start and kept:
                self.journal.end(turn.name, turn.turn_id, feed, (len(feed.framed) + 1, final), trip,
                                 started=turn.journal_start)
            if self.settings.budget and version is not None:
                self.coordination.spend(turn.user, utcnow().date(), turn.tokens(), trip)
            turn.release(trip)

    # Stop and shutdown

    def cut_open_streams(self):
        """End every open stream now with a final error event (the service is shutting down)."""
        for feed in list(self.feeds.values()):
            feed.cut("shutting_down")

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
            raise NoReplyInProgress()
        self.coordination.publish_stop(name)

    def listen_for_stops(self):
        """Start receiving stop signals in this process (once, after gunicorn has forked)."""
        if not self._listening:
            self._listening = True
            self.coordination.listen_for_stops(self._stop_here)

    def _stop_here(self, name):
        """Stop the conversation's stream if this process runs it, with or without a reader."""
        feed = self.feeds.get(name)
        if feed is not None:
            feed.cut("stopped")


def journal_id(state):
    """The start entry's id a journal's start answered, or None for any refusal ("unfinished", ...)."""
    return state if isinstance(state, str) and state[:1].isdigit() else None


def recovered_reply(record):
    """The reply a journal holds: its chunks, up to the first gap."""
    parts = []
    for expected, (number, text) in enumerate(record.events, start=1):
        if number != expected:
            break
        parts.append(sse.content_of(text))
    return "".join(parts)
