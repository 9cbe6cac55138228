"""Configuration: every setting is an environment variable with a default."""

import os

import click

VERSION = "0.5.0"
HERE = os.path.dirname(os.path.abspath(__file__))
INSTANCE_DIR = os.path.join(HERE, "instance")
# Redis connections each worker keeps for commands at most (REDIS_POOL_SIZE).
REDIS_POOL_SIZE = 50


class ConfigError(click.ClickException):
    """A setting the service cannot start with: one clear line (`Error: ...`) from the CLI, exit status 1."""


def _int(name, default):
    """Read an integer environment variable."""
    return _number(name, default, int)


def _int_at_least(name, default, least):
    """Read an integer environment variable that must be at least `least`; a clear error if not."""
    value = _int(name, default)
    if value < least:
        raise ConfigError(f"{name} must be at least {least}, not {os.environ.get(name)!r}")
    return value


def _float(name, default):
    """Read a float environment variable."""
    return _number(name, default, float)


def _number(name, default, kind):
    """Read a number from the environment; a clear error if it is not one."""
    raw = os.environ.get(name, default)
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a {'whole ' if kind is int else ''}number, not {raw!r}") from None


def _float_within(name, default, at_most):
    """Read a float environment variable that must be more than 0 and at most `at_most`; a clear error if not."""
    value = _float(name, default)
    if not 0 < value <= at_most:  # NaN is refused too: no comparison holds for it
        raise ConfigError(f"{name} must be more than 0 and at most {at_most:g}, not {os.environ.get(name)!r}")
    return value


def _flag(name, default):
    """Read a true/false environment variable; a clear error if it is neither."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {os.environ[name]!r}")


class Config:
    """Settings read once from the environment; `create_app(test_config)` can override any."""

    def __init__(self):
        """Read every setting from the environment."""
        self.APP_ENV = os.environ.get("APP_ENV", "production")
        self.PORT = _int("PORT", 8000)
        self.WEB_CONCURRENCY = _int("WEB_CONCURRENCY", 2)
        self.DATABASE_URL = os.environ.get(
            "DATABASE_URL", "sqlite:///" + os.path.join(INSTANCE_DIR, "chat.db"))
        self.DATABASE_POOL_SIZE = _int_at_least("DATABASE_POOL_SIZE", 10, 1)
        self.DATABASE_POOL_TIMEOUT = _float("DATABASE_POOL_TIMEOUT", 10)
        self.DATABASE_TIMEOUT_SECONDS = _float("DATABASE_TIMEOUT_SECONDS", 5)
        self.REDIS_URL = os.environ.get("REDIS_URL") or None
        self.REDIS_TLS_VERIFY = _flag("REDIS_TLS_VERIFY", True)
        self.REDIS_TLS_CA_FILE = os.environ.get("REDIS_TLS_CA_FILE") or None
        self.REDIS_POOL_SIZE = _int_at_least("REDIS_POOL_SIZE", REDIS_POOL_SIZE, 1)
        self.JWT_SECRET_KEY = os.environ.get("JWT_SECRET_KEY") or None
        self.JWT_SECRET_KEY_PREVIOUS = os.environ.get("JWT_SECRET_KEY_PREVIOUS") or None
        self.JWT_PUBLIC_KEY = os.environ.get("JWT_PUBLIC_KEY") or None
        self.JWT_JWKS_URL = os.environ.get("JWT_JWKS_URL") or None
        self.JWT_JWKS_TIMEOUT_SECONDS = _float("JWT_JWKS_TIMEOUT_SECONDS", 3)
        self.JWT_AUDIENCE = os.environ.get("JWT_AUDIENCE") or None
        self.JWT_ISSUER = os.environ.get("JWT_ISSUER") or None
        self.JWT_USER_CLAIM = os.environ.get("JWT_USER_CLAIM") or "sub"
        self.JWT_ALGORITHMS = os.environ.get("JWT_ALGORITHMS") or None
        self.LLM_BASE_URL = (os.environ.get("LLM_BASE_URL") or "").rstrip("/") or None
        self.LLM_API_KEY = os.environ.get("LLM_API_KEY") or None
        self.LLM_MODEL = os.environ.get("LLM_MODEL", "gpt-4o-mini")
        self.LLM_MAX_TOKENS = _int("LLM_MAX_TOKENS", 0)
        self.LLM_TIMEOUT_SECONDS = _float("LLM_TIMEOUT_SECONDS", 60)
        self.LLM_SYSTEM_PROMPT = os.environ.get("LLM_SYSTEM_PROMPT") or None
        self.LLM_CONTEXT_TOKENS = _int("LLM_CONTEXT_TOKENS", 16000)
        self.RATE_LIMIT_PER_MINUTE = _int("RATE_LIMIT_PER_MINUTE", 0)
        self.LOG_LEVEL = os.environ.get("LOG_LEVEL", "info")
        self.CHAT_HISTORY_LIMIT = _int("CHAT_HISTORY_LIMIT", 20)
        self.CACHE_TTL_SECONDS = _int("CACHE_TTL_SECONDS", 86400)
        self.SSE_HEARTBEAT_SECONDS = _float_within("SSE_HEARTBEAT_SECONDS", 10, at_most=3600)
        self.SSE_WRITE_TIMEOUT_SECONDS = _float("SSE_WRITE_TIMEOUT_SECONDS", 30)
        self.CLIENT_READ_TIMEOUT_SECONDS = _float("CLIENT_READ_TIMEOUT_SECONDS", 10)
        # A dead holder frees its conversations within the lease; at 0 its keeper would renew without pause.
        self.LEASE_SECONDS = _float_within("LEASE_SECONDS", 10, at_most=10)
        self.MAX_STREAMS_PER_USER = _int("MAX_STREAMS_PER_USER", 10)
        self.TOKEN_BUDGET_PER_DAY = _int("TOKEN_BUDGET_PER_DAY", 0)
        self.METRICS = os.environ.get("METRICS", "on").lower() not in ("off", "0", "false", "no")
        self.METRICS_TOKEN = os.environ.get("METRICS_TOKEN") or None
        self.STREAM_RETAIN_SECONDS = _float("STREAM_RETAIN_SECONDS", 300)
        self.STREAM_RESUME_GRACE_SECONDS = _float("STREAM_RESUME_GRACE_SECONDS", 20)
        self.MAX_MESSAGE_CHARS = _int("MAX_MESSAGE_CHARS", 32000)
        # The body holds the message and an id; JSON escapes a character outside the BMP
        # as a surrogate pair, "\ud83d\ude00": 12 bytes.
        self.MAX_CONTENT_LENGTH = _int("MAX_CONTENT_LENGTH", self.MAX_MESSAGE_CHARS * 12 + 1024)
        self.WEB_UI = os.environ.get("WEB_UI", "on").strip().lower() not in ("off", "0", "false", "no")

    def as_dict(self):
        """The settings as a plain dict, for `app.config.from_mapping`."""
        return dict(vars(self))
