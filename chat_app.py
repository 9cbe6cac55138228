"""The chat API: the application factory, the /chat blueprint, error handlers and CLI commands."""

import base64
import datetime
import json
import logging
import math
import os
import re
import secrets
import time

import click
import jwt
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from flask.cli import with_appcontext
from flask_jwt_extended import (JWTManager, create_access_token, get_jwt, get_jwt_identity,
                                verify_jwt_in_request)
from flask_jwt_extended.exceptions import JWTExtendedException
from werkzeug.exceptions import HTTPException

import cache
import logs
import models
import web
from config import INSTANCE_DIR, VERSION, Config
from errors import ApiError
from llm import make_model
from turns import NOT_FOUND, ChatService, new_conversation_id, retried_once, stored

log = logging.getLogger("chat_app")

CONVERSATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MIN_SECRET_BYTES = 32
HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 404: "not_found",
              405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}
PAGE_LIMIT, MAX_PAGE_LIMIT = 20, 100
VERIFIED_TOKENS_KEPT = 10000
OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")

chat = Blueprint("chat", __name__, url_prefix="/chat")
conversations = Blueprint("conversations", __name__, url_prefix="/conversations")
status = Blueprint("status", __name__)


def create_app(test_config=None):
    """Build the app from the environment (or `test_config`) and wire its services."""
    app = Flask(__name__, instance_path=INSTANCE_DIR, static_folder=None)
    app.config.from_mapping(Config().as_dict())
    if test_config:
        app.config.from_mapping(test_config)
    logs.configure(app.config["LOG_LEVEL"])
    configure_tokens(app)
    models.open_database(app.config["DATABASE_URL"], app.config["DATABASE_POOL_SIZE"],
                         app.config["DATABASE_POOL_TIMEOUT"])
    model = make_model(app.config)
    app.extensions["chat"] = ChatService(
        model, cache.make_cache(app.config["REDIS_URL"], app.config["CACHE_TTL_SECONDS"]),
        app.config["CHAT_HISTORY_LIMIT"], app.config["LLM_SYSTEM_PROMPT"],
        app.config["SSE_HEARTBEAT_SECONDS"], lock_ttl=app.config["LLM_TIMEOUT_SECONDS"] + 30,
        context_tokens=app.config["LLM_CONTEXT_TOKENS"])
    app.register_blueprint(chat)
    app.register_blueprint(conversations)
    app.register_blueprint(status)
    web.init_app(app)
    app.wsgi_app = logs.RequestLog(app.wsgi_app)
    app.register_error_handler(ApiError, api_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)
    app.cli.add_command(init_db_command)
    app.cli.add_command(create_token_command)
    app.cli.add_command(prune_command)
    return app


def announce(app):
    """Log where replies come from (each gunicorn worker does, once it is up)."""
    log.info("model backend: %s", describe_model(app.extensions["chat"].model))


def describe_model(model):
    """One line saying where replies come from."""
    about = model.describe()
    if about["backend"] == "demo":
        return "built-in demo model (offline, canned replies); set LLM_BASE_URL to use a real model"
    return f"{about['backend']} at {about['base_url']}, model {about['model']}"


def configure_tokens(app):
    """Set up HS256 JWTs, refusing a weak secret in production."""
    secret = app.config["JWT_SECRET_KEY"]
    if not secret and app.config["APP_ENV"] == "development":
        secret = local_secret(app.instance_path)
    if not secret or len(secret.encode()) < MIN_SECRET_BYTES:
        raise RuntimeError(f"JWT_SECRET_KEY must be set to at least {MIN_SECRET_BYTES} bytes "
                           "(or APP_ENV=development to generate a local one)")
    app.config.update(JWT_SECRET_KEY=secret, JWT_ALGORITHM="HS256",
                      JWT_DECODE_ALGORITHMS=["HS256"], JWT_TOKEN_LOCATION=["headers"])
    JWTManager(app)
    app.extensions["verified_tokens"] = VerifiedTokens()


def local_secret(instance_path):
    """A secret generated once and kept in the instance folder, for local development."""
    path = os.path.join(instance_path, "jwt-secret")
    if not os.path.exists(path):
        os.makedirs(instance_path, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(48))
    with open(path) as kept:
        return kept.read().strip()


def authenticated_user():
    """The `sub` of the request's bearer token; 401 for any problem with the token."""
    header = request.headers.get("Authorization", "")
    tokens = current_app.extensions["verified_tokens"]
    user = tokens.user_of(header)
    if user is None:
        user, expires = verified_token()
        tokens.remember(header, user, expires)
    note(user=user)
    limit_rate(user)
    return user


def verified_token():
    """The user and expiry of the request's bearer token, as flask-jwt-extended checks it; 401 if bad."""
    try:
        verify_jwt_in_request()
        user, expires = get_jwt_identity(), get_jwt().get("exp")
    except jwt.ExpiredSignatureError:
        raise ApiError(401, "unauthorized", "the token has expired") from None
    except (JWTExtendedException, jwt.PyJWTError) as exc:
        missing = "Missing Authorization Header" in str(exc)
        message = "send a bearer token: Authorization: Bearer <token>" if missing else "the token is not valid"
        raise ApiError(401, "unauthorized", message) from None
    if not isinstance(user, str) or not user:
        raise ApiError(401, "unauthorized", "the token has no subject")
    return user, expires


class VerifiedTokens:
    """Authorization headers whose token was verified, with its user and expiry.

    A client sends the same token with every request; checking its signature and claims
    again was about 6% of a turn's CPU. Only a token that passed every check is kept,
    and it is refused again from the moment it expires. The oldest are forgotten first.
    """

    def __init__(self, size=VERIFIED_TOKENS_KEPT):
        """None kept yet; at most `size`."""
        self.size = size
        self._kept = {}

    def user_of(self, header):
        """The user of an already verified header that has not expired since, else None."""
        kept = self._kept.get(header)
        if kept is None:
            return None
        user, expires = kept
        if expires <= time.time():
            self._kept.pop(header, None)
            return None
        return user

    def remember(self, header, user, expires):
        """Keep a verified header's user until `expires` (a Unix time; None: never)."""
        if len(self._kept) >= self.size:
            self._kept.pop(next(iter(self._kept)), None)
        self._kept[header] = (user, math.inf if expires is None else expires)


def note(**fields):
    """Add fields to this request's log line."""
    request.environ.setdefault(logs.RECORD_KEY, {}).update(fields)


def limit_rate(user):
    """429 once `user` has made RATE_LIMIT_PER_MINUTE requests this minute (off when 0)."""
    limit = current_app.config["RATE_LIMIT_PER_MINUTE"]
    if limit and current_app.extensions["chat"].cache.count_request(user, 60) > limit:
        retry_after = str(60 - int(time.time()) % 60)
        raise ApiError(429, "rate_limited", f"at most {limit} requests a minute",
                       {"Retry-After": retry_after})


def chat_request():
    """The validated (message, conversation_id) of a chat request body."""
    body = json_body()
    return valid_message(body.get("message")), valid_conversation_id(body.get("conversation_id"))


def conversation_id_in(body):
    """The required conversation_id of a body."""
    conversation_id = body.get("conversation_id")
    if conversation_id is None:
        raise ApiError(400, "invalid_request", "conversation_id is required")
    return valid_conversation_id(conversation_id)


def valid_message(message):
    """The message, if it is a non-empty string the database can keep."""
    if not isinstance(message, str) or not message.strip():
        raise ApiError(400, "invalid_request", "message must be a non-empty string")
    limit = current_app.config["MAX_MESSAGE_CHARS"]
    if len(message) > limit:
        raise ApiError(413, "too_large", f"message must be at most {limit} characters")
    if "\x00" in message:
        raise ApiError(400, "invalid_request", "message must not contain NUL characters")
    if not encodable(message):
        raise ApiError(400, "invalid_request", "message must be valid Unicode (no lone surrogates)")
    return message


def valid_conversation_id(conversation_id):
    """The conversation id, or a new one when none is given."""
    if conversation_id is None:
        return new_conversation_id()
    if not isinstance(conversation_id, str) or not CONVERSATION_ID.fullmatch(conversation_id):
        raise ApiError(400, "invalid_request",
                       "conversation_id must be 1 to 128 letters, digits, '-', '_', '.' or ':'")
    return conversation_id


def turn_request():
    """The caller, message and conversation of a chat turn (noted in the request log)."""
    user = authenticated_user()
    message, conversation_id = chat_request()
    note(conversation_id=conversation_id)
    return user, conversation_id, message


@chat.post("/run")
def run():
    """Answer a chat turn in one JSON reply."""
    user, conversation_id, message = turn_request()
    reply = current_app.extensions["chat"].run(user, conversation_id, message, log_record())
    return jsonify(response=reply, conversation_id=conversation_id)


@chat.post("/stream")
def stream():
    """Answer a chat turn as server-sent events."""
    user, conversation_id, message = turn_request()
    events = current_app.extensions["chat"].stream(user, conversation_id, message, log_record())
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
               "Connection": "keep-alive", "X-Conversation-Id": conversation_id}
    return Response(events, mimetype="text/event-stream", headers=headers)


def log_record():
    """This request's log line, for the turn to fill in."""
    return request.environ.setdefault(logs.RECORD_KEY, {})


@chat.post("/stop")
def stop():
    """Stop the reply being streamed for a conversation."""
    user = authenticated_user()
    conversation_id = conversation_id_in(json_body())
    note(conversation_id=conversation_id)
    current_app.extensions["chat"].stop(user, conversation_id)
    return jsonify(conversation_id=conversation_id, stopping=True), 202


@conversations.get("")
def list_conversations():
    """The caller's conversations, newest activity first, a page at a time."""
    user = authenticated_user()
    limit = page_limit()
    after = read_cursor(request.args.get("cursor"), list)
    with stored():
        page = models.Conversation.page_of(user, limit + 1, after)
    following = None
    if len(page) > limit:
        page = page[:limit]
        following = make_cursor([models.as_datetime(page[-1].updated_at).isoformat(), page[-1].id])
    return jsonify(conversations=[c.as_json() for c in page], next_cursor=following)


@conversations.get("/<conversation_id>")
def read_conversation(conversation_id):
    """A conversation and its messages in order, a page at a time."""
    user = authenticated_user()
    note(conversation_id=conversation_id)
    limit = page_limit()
    after = read_cursor(request.args.get("cursor"), int) or 0
    with stored():
        conversation = owned_conversation(conversation_id, user)
        page = models.Message.page_of(conversation_id, limit + 1, after)
        count = models.Message.count_in(conversation_id)
    following = make_cursor(page[limit - 1].id) if len(page) > limit else None
    return jsonify(conversation=conversation.as_json(count),
                   messages=[m.as_json() for m in page[:limit]], next_cursor=following)


@conversations.patch("/<conversation_id>")
def rename_conversation(conversation_id):
    """Give a conversation a new title."""
    user = authenticated_user()
    note(conversation_id=conversation_id)
    title = json_body().get("title")
    if not isinstance(title, str) or not title.strip() or len(title) > models.TITLE_CHARS:
        raise ApiError(400, "invalid_request", f"title must be 1 to {models.TITLE_CHARS} characters")
    if "\x00" in title or not encodable(title):
        raise ApiError(400, "invalid_request", "title must be valid text")
    with stored():
        conversation = owned_conversation(conversation_id, user)
        conversation.title = title.strip()
        conversation.save()
        count = models.Message.count_in(conversation_id)
    return jsonify(conversation=conversation.as_json(count))


@conversations.delete("/<conversation_id>")
def delete_conversation(conversation_id):
    """Delete a conversation and its messages, from the database and the cache."""
    user = authenticated_user()
    note(conversation_id=conversation_id)
    current_app.extensions["chat"].forget(user, valid_path_id(conversation_id))
    return "", 204


def owned_conversation(conversation_id, user):
    """The caller's conversation, or the 404 that also answers for anyone else's."""
    conversation = models.Conversation.owned(valid_path_id(conversation_id), user)
    if conversation is None:
        raise NOT_FOUND
    return conversation


def valid_path_id(conversation_id):
    """A conversation id from the URL, or 404 (no conversation can have a malformed id)."""
    if not CONVERSATION_ID.fullmatch(conversation_id):
        raise NOT_FOUND
    return conversation_id


def page_limit():
    """The `limit` query parameter: 1 to 100, 20 by default."""
    raw = request.args.get("limit", str(PAGE_LIMIT))
    if not re.fullmatch(r"[0-9]{1,3}", raw) or not 1 <= int(raw) <= MAX_PAGE_LIMIT:
        raise ApiError(400, "invalid_request", f"limit must be a whole number from 1 to {MAX_PAGE_LIMIT}")
    return int(raw)


def make_cursor(position):
    """An opaque cursor for the page after `position`."""
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


def read_cursor(cursor, kind):
    """The position a cursor stands for (None without one); 400 for a cursor we did not make."""
    if cursor is None:
        return None
    try:
        position = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except ValueError:
        position = None
    if kind is int and isinstance(position, int) and not isinstance(position, bool):
        return position
    if kind is list and isinstance(position, list) and len(position) == 2 \
            and all(isinstance(p, str) for p in position):
        try:
            return [datetime.datetime.fromisoformat(position[0]), position[1]]
        except ValueError:
            pass
    raise ApiError(400, "invalid_request", "cursor is not one this service returned")


def json_body():
    """The request's JSON object body."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send a JSON body with Content-Type: application/json")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object")
    return body


def encodable(text):
    """Whether text is valid Unicode the database can keep (no lone surrogates)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@status.get("/status")
def service_status():
    """Say the service is up, and how its database, cache and model are, with round-trip times."""
    service = current_app.extensions["chat"]
    database = probe(database_round_trip)
    cache_state = probe(service.cache.ping)
    healthy = database["state"] == cache_state["state"] == "ok"
    return jsonify(status="ok" if healthy else "degraded", version=VERSION,
                   database={**database, "backend": models.backend_name()},
                   cache={**cache_state, "backend": service.cache.backend},
                   model=service.model.describe())


@status.get("/openapi.json")
def openapi():
    """The OpenAPI 3.1 document of this API."""
    with open(OPENAPI_PATH) as document:
        return current_app.response_class(document.read(), mimetype="application/json")


def database_round_trip():
    """Run the cheapest query there is."""
    def select_one():
        """SELECT 1 on a pooled connection."""
        with stored():
            models.db.execute_sql("SELECT 1")

    retried_once(select_one)


def probe(check):
    """{"state": "ok", "round_trip_ms": ...} if `check` succeeds, else {"state": "unavailable"}."""
    started = time.monotonic()
    try:
        check()
    except Exception as exc:  # noqa: BLE001 - any failure is what /status reports
        log.warning("status check failed: %s", type(exc).__name__)
        return {"state": "unavailable"}
    return {"state": "ok", "round_trip_ms": round((time.monotonic() - started) * 1000, 2)}


def api_error(error):
    """Answer an ApiError in the one error shape."""
    response = jsonify(error.body())
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def http_error(error):
    """Answer Flask's own HTTP errors (404, 405, 413, ...) in the one error shape."""
    code = HTTP_CODES.get(error.code, "http_error")
    message = {404: "no such endpoint", 405: "method not allowed for this endpoint",
               413: "the request body is too large"}.get(error.code, error.description)
    response = api_error(ApiError(error.code, code, message))
    if error.code == 405:
        response.headers["Allow"] = ", ".join(error.valid_methods or [])
    return response


def unexpected_error(error):
    """Log a bug and answer 500 without details."""
    log.exception("unexpected error")
    return api_error(ApiError(500, "internal_error", "internal error"))


@click.command("init-db")
@with_appcontext
def init_db_command():
    """Create the database tables."""
    with models.db.connection_context():
        models.create_tables()
    click.echo("database tables are ready")


@click.command("create-token")
@click.argument("user")
@click.option("--expires-in", default=86400, show_default=True, type=click.IntRange(min=0),
              help="Seconds until the token expires; 0 for a token that never expires.")
@click.option("--link", is_flag=True, help="Print a sign-in link to the chat page instead of the bare token.")
@click.option("--base-url", help="The page's address for --link (implies it)  [default: http://localhost:PORT]")
@with_appcontext
def create_token_command(user, expires_in, link, base_url):
    """Print an access token for USER, or a sign-in link to the chat page holding it."""
    expires = datetime.timedelta(seconds=expires_in) if expires_in > 0 else False
    token = create_access_token(identity=user, expires_delta=expires)
    if link or base_url:
        click.echo(web.sign_in_link(token, base_url or f"http://localhost:{current_app.config['PORT']}"))
    else:
        click.echo(token)


@click.command("prune")
@click.option("--older-than", "days", type=click.IntRange(min=0), required=True,
              help="Delete conversations with no activity for this many days.")
@with_appcontext
def prune_command(days):
    """Delete old conversations and their messages."""
    cutoff = models.utcnow() - datetime.timedelta(days=days)
    removed = current_app.extensions["chat"].prune(cutoff)
    click.echo(f"deleted {removed} conversations with no activity for {days} days")
