"""The one shape of every error the API returns, and the kinds of error with a fixed meaning."""

import datetime
import math


class ApiError(Exception):
    """An error a client sees: an HTTP status, a stable code and a readable message."""

    status = 500
    code = "internal_error"
    message = "internal error"

    def __init__(self, status=None, code=None, message=None, headers=None):
        """An error answered with `status` and `{"error": {"code", "message"}}` (a kind's own by default)."""
        self.status = status or self.status
        self.code = code or self.code
        self.message = message or self.message
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self):
        """The JSON body of the error."""
        return {"error": {"code": self.code, "message": self.message}}


class NotFound(ApiError):
    """The conversation is not the caller's (or not there: the two are never told apart)."""

    status, code, message = 404, "not_found", "conversation not found"


class ConversationBusy(ApiError):
    """Another turn of the conversation (or its deletion) is in progress."""

    status, code, message = 409, "conversation_busy", "another turn of this conversation is in progress"


class DatabaseDown(ApiError):
    """The database cannot be used right now (models.DatabaseUnavailable, as a client sees it)."""

    status, code, message = 503, "database_unavailable", "the database is unavailable"


class ShuttingDown(ApiError):
    """The service is stopping and cut the reply short."""

    status, code, message = 503, "shutting_down", "the service is restarting; the reply was cut short"


class InvalidRequest(ApiError):
    """The request is malformed: the message says how."""

    status, code = 400, "invalid_request"


class Unauthorized(ApiError):
    """No usable bearer token: the message says what is wrong with it."""

    status, code, message = 401, "unauthorized", "the token is not valid"


class TooManyStreams(ApiError):
    """The user has as many streams open as MAX_STREAMS_PER_USER allows."""

    status, code = 429, "too_many_streams"

    def __init__(self, limit):
        """At most `limit` streams at once."""
        super().__init__(message=f"at most {limit} streams may be open at once; close one first")


class BudgetExceeded(ApiError):
    """The user has spent TOKEN_BUDGET_PER_DAY today; it resets at midnight UTC."""

    status, code = 429, "budget_exceeded"

    def __init__(self, budget):
        """Spent all of `budget` tokens today: say when it resets, and Retry-After until then."""
        now = datetime.datetime.now(datetime.timezone.utc)
        midnight = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        super().__init__(message=f"the daily budget of {budget} tokens is spent; it resets at "
                                 f"{midnight.strftime('%Y-%m-%dT%H:%M:%SZ')}",
                         headers={"Retry-After": str(max(1, math.ceil((midnight - now).total_seconds())))})


class ContextTooLarge(ApiError):
    """The message does not fit the model's context, even without history (the estimate's budget, or the model)."""

    status, code = 413, "context_too_large"
    message = "the message does not fit in the model's context window, even without history"


class EmptyStream(ApiError):
    """The model answered 200 and sent no event at all (llama-cpp-python, when the prompt does not fit)."""

    status, code, message = 502, "llm_incomplete", "the model's stream ended before its first event"


class ResumeUnavailable(ApiError):
    """The journal cannot be read, so no instance can replay the turn now."""

    status, code = 503, "resume_unavailable"
    message = "the stream cannot be resumed right now (its journal is unavailable); the reply will be in the history"


class RecoveryUnavailable(ApiError):
    """A dead process left the conversation's last turn, and its journal cannot be read to save it before the next."""

    status, code = 503, "recovery_unavailable"
    message = ("an instance that stopped left this conversation's last turn, and it cannot be saved right now "
               "(its journal is unavailable); try again shortly")

    def __init__(self):
        """Retry in a couple of seconds (Redis is tried again after a second)."""
        super().__init__(headers={"Retry-After": "2"})


class NoReplyInProgress(ApiError):
    """/chat/stop for a conversation with no stream running."""

    status, code, message = 409, "no_reply_in_progress", "no reply is being streamed for this conversation"


class TurnTakenOver(ApiError):
    """This process stalled past its lease, and another saved the turn meanwhile (as interrupted)."""

    status, code = 409, "turn_taken_over"
    message = ("this instance lost hold of the conversation while it stalled; the turn was kept as far as "
               "another instance had it")


class RateLimited(ApiError):
    """More requests in the last minute than RATE_LIMIT_PER_MINUTE."""

    status, code = 429, "rate_limited"

    def __init__(self, limit, retry_after):
        """At most `limit` a minute; retry in `retry_after` seconds."""
        super().__init__(message=f"at most {limit} requests a minute", headers={"Retry-After": str(retry_after)})
