"""Who spent what: tokens and turns per user, day and model, from the kept replies."""

import datetime

from models import Message, retried_once, utcnow

MAX_DAYS = 366


def today():
    """Today's date (UTC), the day usage is counted in."""
    return utcnow().date()


def days_ago(days):
    """The date `days` days before today (UTC)."""
    return today() - datetime.timedelta(days=days)


def usage(since, until, user=None):
    """Rows of (user, date, model, turns, prompt_tokens, completion_tokens, estimated_turns) for the days
    `since` to `until` (dates, both included), one user's or everyone's.

    `estimated_turns` counts the turns whose figures are the service's estimate, the model having
    reported no usage of its own.
    """
    start = datetime.datetime.combine(since, datetime.time())
    return retried_once(lambda: Message.usage(start, end_of(until), user))


def end_of(day):
    """The moment `day` (a date) ends: the next midnight, or the last moment a datetime can name after 9999-12-31."""
    if day == datetime.date.max:
        return datetime.datetime.max
    return datetime.datetime.combine(day + datetime.timedelta(days=1), datetime.time())


def totals(rows):
    """The sums of usage rows: turns, prompt and completion tokens, estimated turns."""
    keys = ("turns", "prompt_tokens", "completion_tokens", "estimated_turns")
    return {key: sum(row[key] for row in rows) for key in keys}


def per_user(rows):
    """Usage rows summed per user and model, over all their days."""
    summed = {}
    for row in rows:
        key = (row["user"], row["model"])
        into = summed.setdefault(key, {"user": row["user"], "model": row["model"], "turns": 0, "prompt_tokens": 0,
                                       "completion_tokens": 0, "estimated_turns": 0})
        for field in ("turns", "prompt_tokens", "completion_tokens", "estimated_turns"):
            into[field] += row[field]
    return list(summed.values())
