"""The chat API: the application factory, its blueprints, error handlers and CLI commands."""

import base64
import csv
import datetime
import functools
import hmac
import json
import logging
import os
import re
import sys

import click
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from flask.cli import with_appcontext
from flask_jwt_extended import create_access_token
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import ClientDisconnected, HTTPException

import auth
import logs
import models
import web
from auth import note
from cache import MemoryCache, RedisCache
from config import INSTANCE_DIR, VERSION, Config
from coordination import MemoryCoordination, RedisCoordination
from errors import ApiError, DatabaseDown, InvalidRequest, NotFound
from health import Health
from history import TITLE_CHARS, History
from journal import RedisJournal
from llm import make_model
from metrics import Meter, exposition
from redis_link import RedisLink
from resume import Replays
from turns import ChatService, Shared, TurnSettings, new_conversation_id
from usage import MAX_DAYS, days_ago, per_user, today, totals, usage

log = logging.getLogger("chat_app")

CONVERSATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
EVENT_ID = re.compile(r"([0-9a-f]{16}):([0-9]{1,9})")
HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 404: "not_found",
              405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}
PAGE_LIMIT, MAX_PAGE_LIMIT = 20, 100
MAX_MESSAGE_ID = 2**62
OPENAPI_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openapi.json")

chat = Blueprint("chat", __name__, url_prefix="/chat")
conversations = Blueprint("conversations", __name__, url_prefix="/conversations")
usage_routes = Blueprint("usage", __name__, url_prefix="/usage")
status = Blueprint("status", __name__)
for private in (chat, conversations, usage_routes):
    private.before_request(auth.authenticate)


@chat.after_request
@conversations.after_request
@usage_routes.after_request
def private_headers(response):
    """An answer for one user: never kept by a cache on the way, never sniffed as another type."""
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def create_app(test_config=None):
    """Build the app from the environment (or `test_config`) and wire its services."""
    app = Flask(__name__, instance_path=INSTANCE_DIR, static_folder=None)
    app.config.from_mapping(Config().as_dict())
    if test_config:
        app.config.from_mapping(test_config)
    logs.configure(app.config["LOG_LEVEL"])
    auth.init_app(app)
    models.open_database(app.config["DATABASE_URL"], app.config["DATABASE_POOL_SIZE"],
                         app.config["DATABASE_POOL_TIMEOUT"])
    wire_services(app)
    app.register_blueprint(chat)
    app.register_blueprint(conversations)
    app.register_blueprint(usage_routes)
    app.register_blueprint(status)
    web.init_app(app)
    app.wsgi_app = logs.RequestLog(app.wsgi_app, on_done=app.extensions["meter"].request)
    app.before_request(note_route)
    app.register_error_handler(ApiError, api_error)
    app.register_error_handler(models.DatabaseUnavailable, database_unavailable)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)
    for command in (init_db_command, create_token_command, prune_command, usage_command):
        app.cli.add_command(command)
    return app


def wire_services(app):
    """Build the cache, the coordination between processes, the model and the services on them."""
    config = app.config
    meter = app.extensions["meter"] = Meter(enabled=config["METRICS"])
    shared = shared_stores(config)
    service = ChatService(make_model(config), shared, TurnSettings.of(config), meter)
    app.extensions["chat"] = service
    app.extensions["replays"] = Replays(service)
    app.extensions["coordination"] = shared.coordination
    app.extensions["history"] = History(shared.cache, shared.coordination, shared.round_trip, shared.journal,
                                        service.recover_if_left)
    app.extensions["health"] = Health(shared.cache, shared.coordination, service.describe_model, meter=meter)


def shared_stores(config):
    """What the processes share: in Redis when REDIS_URL is set, else in this process."""
    if not config["REDIS_URL"]:
        return Shared(MemoryCache(config["CACHE_TTL_SECONDS"]), MemoryCoordination(config["LEASE_SECONDS"]))
    link = RedisLink(config["REDIS_URL"], config["REDIS_TLS_VERIFY"], config["REDIS_TLS_CA_FILE"],
                     config["REDIS_POOL_SIZE"])
    return Shared(RedisCache(link, config["CACHE_TTL_SECONDS"]), RedisCoordination(link, config["LEASE_SECONDS"]),
                  RedisJournal(link, config["STREAM_RETAIN_SECONDS"]), link.round_trip)


def note_route():
    """Keep the request's URL rule (never its path, which may hold an id) for the request metrics."""
    request.environ[logs.ROUTE_KEY] = request.url_rule.rule if request.url_rule is not None else "unmatched"


def announce(app):
    """Log where replies come from (each gunicorn worker does, once it is up)."""
    log.info("model backend: %s", describe_model(app.extensions["chat"].describe_model()))


def describe_model(about):
    """One line saying where replies come from."""
    if about["backend"] == "demo":
        return "built-in demo model (offline, canned replies); set LLM_BASE_URL to use a real model"
    return f"{about['backend']} at {about['base_url']}, model {about['model']}"


def chat_request():
    """The validated (message, conversation_id) of a chat request body."""
    body = json_body()
    return valid_message(body.get("message")), valid_conversation_id(body.get("conversation_id"))


def conversation_id_in(body):
    """The required conversation_id of a body."""
    conversation_id = body.get("conversation_id")
    if conversation_id is None:
        raise InvalidRequest(message="conversation_id is required")
    return valid_conversation_id(conversation_id)


def valid_message(message):
    """The message, if it is a non-empty string the database can keep."""
    if not isinstance(message, str) or not message.strip():
        raise InvalidRequest(message="message must be a non-empty string")
    limit = current_app.config["MAX_MESSAGE_CHARS"]
    if len(message) > limit:
        raise ApiError(413, "too_large", f"message must be at most {limit} characters")
    if "\x00" in message:
        raise InvalidRequest(message="message must not contain NUL characters")
    if not encodable(message):
        raise InvalidRequest(message="message must be valid Unicode (no lone surrogates)")
    return message


def valid_conversation_id(conversation_id):
    """The conversation id, or a new one when none is given."""
    if conversation_id is None:
        return new_conversation_id()
    if not isinstance(conversation_id, str) or not CONVERSATION_ID.fullmatch(conversation_id):
        raise InvalidRequest(message="conversation_id must be 1 to 128 letters, digits, '-', '_', '.' or ':'")
    return conversation_id


def valid_title(title):
    """A conversation title, if it is 1 to TITLE_CHARS characters of valid text."""
    if not isinstance(title, str) or not title.strip() or len(title) > TITLE_CHARS:
        raise InvalidRequest(message=f"title must be 1 to {TITLE_CHARS} characters")
    if "\x00" in title or not encodable(title):
        raise InvalidRequest(message="title must be valid text")
    return title


def turn_request():
    """The message and conversation of a chat turn (noted in the request log)."""
    message, conversation_id = chat_request()
    note(conversation_id=conversation_id)
    return conversation_id, message


def services(name):
    """One of the services the factory wired: "chat", "history" or "health"."""
    return current_app.extensions[name]


@chat.post("/run")
def run():
    """Answer a chat turn in one JSON reply."""
    conversation_id, message = turn_request()
    reply = services("chat").run(g.user, conversation_id, message, log_record())
    return jsonify(response=reply, conversation_id=conversation_id)


@chat.post("/stream")
def stream():
    """Answer a chat turn as server-sent events."""
    conversation_id, message = turn_request()
    events = services("chat").stream(g.user, conversation_id, message, log_record())
    return event_stream(events, conversation_id)


@chat.get("/stream/<conversation_id>")
def resume(conversation_id):
    """Stream the conversation's current or last turn from after the Last-Event-ID: replay, then live."""
    note(conversation_id=conversation_id)
    events = services("replays").resume(g.user, valid_path_id(conversation_id), last_event_id())
    if events is None:
        return "", 204
    return event_stream(events, conversation_id)


def event_stream(events, conversation_id):
    """A server-sent events response."""
    headers = {"Cache-Control": "no-cache, no-store", "X-Accel-Buffering": "no",
               "Connection": "keep-alive", "X-Conversation-Id": conversation_id}
    # Passed through as it is: the server iterates the events themselves, with no encoding layer between.
    return Response(events, mimetype="text/event-stream", headers=headers, direct_passthrough=True)


def last_event_id():
    """The (turn id, event number) of the Last-Event-ID header, None without one; 400 if it is not one of ours."""
    given = request.headers.get("Last-Event-ID")
    if given is None or not given.strip():
        return None
    found = EVENT_ID.fullmatch(given.strip())
    if found is None:
        raise InvalidRequest(message="Last-Event-ID must be the id of an event of this service (turn:number)")
    return found.group(1), int(found.group(2))


def log_record():
    """This request's log line, for the turn to fill in."""
    return request.environ.setdefault(logs.RECORD_KEY, {})


@chat.post("/stop")
def stop():
    """Stop the reply being streamed for a conversation."""
    conversation_id = conversation_id_in(json_body())
    note(conversation_id=conversation_id)
    services("chat").stop(g.user, conversation_id)
    return jsonify(conversation_id=conversation_id, stopping=True), 202


@conversations.get("")
def list_conversations():
    """The caller's conversations, newest activity first, a page at a time."""
    limit = page_limit()
    after = read_cursor(request.args.get("cursor"), list)
    page, following = services("history").conversations(g.user, limit, after)
    return jsonify(conversations=page, next_cursor=following and make_cursor(following))


@conversations.get("/<conversation_id>")
def read_conversation(conversation_id):
    """A conversation and its messages in order, a page at a time."""
    note(conversation_id=conversation_id)
    limit = page_limit()
    after = read_cursor(request.args.get("cursor"), int) or 0
    conversation, messages, following = services("history").conversation(
        g.user, valid_path_id(conversation_id), limit, after)
    return jsonify(conversation=conversation, messages=messages,
                   next_cursor=following and make_cursor(following))


@conversations.patch("/<conversation_id>")
def rename_conversation(conversation_id):
    """Give a conversation a new title."""
    note(conversation_id=conversation_id)
    title = valid_title(json_body().get("title"))
    conversation = services("history").rename(g.user, valid_path_id(conversation_id), title)
    return jsonify(conversation=conversation)


@conversations.delete("/<conversation_id>")
def delete_conversation(conversation_id):
    """Delete a conversation and its messages, from the database and the cache."""
    note(conversation_id=conversation_id)
    services("history").delete(g.user, valid_path_id(conversation_id))
    return "", 204


def valid_path_id(conversation_id):
    """A conversation id from the URL, or 404 (no conversation can have a malformed id)."""
    if not CONVERSATION_ID.fullmatch(conversation_id):
        raise NotFound()
    return conversation_id


def page_limit():
    """The `limit` query parameter: 1 to 100, 20 by default."""
    raw = request.args.get("limit", str(PAGE_LIMIT))
    if not re.fullmatch(r"[0-9]{1,3}", raw) or not 1 <= int(raw) <= MAX_PAGE_LIMIT:
        raise InvalidRequest(message=f"limit must be a whole number from 1 to {MAX_PAGE_LIMIT}")
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
    except (ValueError, RecursionError):
        position = None
    if kind is int and isinstance(position, int) and not isinstance(position, bool) \
            and 0 <= position <= MAX_MESSAGE_ID:
        return position
    if kind is list and isinstance(position, list) and len(position) == 2 \
            and all(isinstance(p, str) for p in position) and CONVERSATION_ID.fullmatch(position[1]):
        try:
            return [datetime.datetime.fromisoformat(position[0]), position[1]]
        except ValueError:
            pass
    raise InvalidRequest(message="cursor is not one this service returned")


def json_body():
    """The request's JSON object body."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send a JSON body with Content-Type: application/json")
    try:
        body = json.loads(request_bytes())
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python's parser goes
        body = None
    except (ClientDisconnected, OSError):  # the worker's deadline on a client that sends too slowly
        raise ApiError(408, "request_timeout", "the request body did not arrive in time") from None
    except ParseException:  # gunicorn's reading of a chunked body whose framing is broken
        raise InvalidRequest(message="the request body's chunked encoding is malformed") from None
    if not isinstance(body, dict):
        raise InvalidRequest(message="the body must be a JSON object")
    return body


def request_bytes():
    """The request body, refused with 413 past MAX_CONTENT_LENGTH however it is sent.

    A body with a Content-Length over the limit is refused before it is read (by Flask); a
    chunked one has no length to refuse, so it is read up to one byte past the limit.
    """
    if request.content_length is not None:
        return request.get_data()
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    body = request.environ["wsgi.input"].read(limit + 1)
    if len(body) > limit:
        raise ApiError(413, "too_large", "the request body is too large")
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
    """Say whether the service and its parts are up; with a valid token, how they are, in detail, and who asks."""
    report = services("health").report()
    user = auth.optional_user()
    if user is None:
        return jsonify(status=report["status"], database={"state": report["database"]["state"]},
                       cache={"state": report["cache"]["state"]})
    response = jsonify(status=report["status"], user=user, version=VERSION, database=report["database"],
                       cache=report["cache"], model=report["model"])
    return private_headers(response)


@status.get("/metrics")
def prometheus_metrics():
    """The service's metrics in Prometheus's text format (METRICS_TOKEN, if set, as a bearer token)."""
    config = current_app.config
    if not config["METRICS"]:
        raise ApiError(404, "not_found", "no such endpoint")
    expected = config["METRICS_TOKEN"]
    given = request.headers.get("Authorization", "")
    if expected and not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
        raise ApiError(401, "unauthorized", "send the metrics token: Authorization: Bearer <METRICS_TOKEN>")
    services("health").report()  # the parts' up gauges, checked at most once a second
    body, content_type = exposition()
    return current_app.response_class(body, content_type=content_type)


@usage_routes.get("")
def read_usage():
    """The caller's tokens and turns per day and model, from `since` to `until` (dates, both included)."""
    since = query_date("since", days_ago(29))
    until = query_date("until", today())
    if since > until or (until - since).days >= MAX_DAYS:
        raise InvalidRequest(message=f"since must be on or before until, at most {MAX_DAYS} days apart")
    rows = [{k: v for k, v in row.items() if k != "user"} for row in usage(since, until, g.user)]
    return jsonify(since=since.isoformat(), until=until.isoformat(), days=rows, total=totals(rows))


def query_date(name, default):
    """A YYYY-MM-DD query parameter as a date, or `default`; 400 if it is not one."""
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", raw):
            return datetime.date.fromisoformat(raw)
    except ValueError:
        pass
    raise InvalidRequest(message=f"{name} must be a date, YYYY-MM-DD")


@status.get("/openapi.json")
def openapi():
    """The OpenAPI 3.1 document of this API."""
    with open(OPENAPI_PATH) as document:
        return current_app.response_class(document.read(), mimetype="application/json")


def api_error(error):
    """Answer an ApiError in the one error shape."""
    response = jsonify(error.body())
    response.status_code = error.status
    response.headers.update(error.headers)
    return response


def database_unavailable(error):
    """Answer a database failure as a 503."""
    return api_error(DatabaseDown())


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
    return api_error(ApiError())


def plain_failures(command):
    """A CLI command whose failure is one clear line (`Error: ...`) and exit status 1, never a traceback."""
    @functools.wraps(command)
    def run(*args, **kwargs):
        """Run the command."""
        try:
            with models.outage.said_by_caller():
                return command(*args, **kwargs)
        except models.DatabaseUnavailable as exc:
            raise click.ClickException(f"the database cannot be used: {exc}") from None
    return run


@click.command("init-db")
@with_appcontext
@plain_failures
def init_db_command():
    """Create the database tables (and move an earlier layout's data into them)."""
    with models.connection():
        models.create_tables()
    click.echo("database tables are ready")


@click.command("create-token")
@click.argument("user")
@click.option("--expires-in", default=86400, show_default=True, type=click.IntRange(min=0),
              help="Seconds until the token expires; 0 for a token that never expires.")
@click.option("--link", is_flag=True, help="Print a sign-in link to the chat page instead of the bare token.")
@click.option("--base-url", help="The page's address for --link (implies it)  [default: http://localhost:PORT]")
@with_appcontext
@plain_failures
def create_token_command(user, expires_in, link, base_url):
    """Print an access token for USER, or a sign-in link to the chat page holding it."""
    if not auth.can_sign():
        raise click.ClickException("create-token cannot mint tokens for your identity provider: they come from "
                                   "it (set JWT_SECRET_KEY for tokens of this service's own)")
    if not auth.usable_user(user):
        raise click.BadParameter(f"must be 1 to {auth.USER_CHARS} characters of text", param_hint="USER")
    expires = datetime.timedelta(seconds=expires_in) if expires_in > 0 else False
    token = create_access_token(identity=user, expires_delta=expires)
    if link or base_url:
        click.echo(web.sign_in_link(token, base_url or f"http://localhost:{current_app.config['PORT']}"))
    else:
        click.echo(token)


@click.command("prune")
@click.option("--older-than", "days", type=click.IntRange(min=0), required=True,
              help="Delete conversations with no activity for this many days.")
@click.option("--yes", is_flag=True, help="Delete without asking.")
@with_appcontext
@plain_failures
def prune_command(days, yes):
    """Delete old conversations and their messages (says what first, and asks unless --yes)."""
    idle = datetime.timedelta(days=days)
    conversations_count, messages_count = services("history").stale(idle)
    click.echo(f"{conversations_count} conversations ({messages_count} messages) have had no activity "
               f"for {days} days")
    if conversations_count == 0:
        return
    if not yes:
        click.confirm("Delete them?", abort=True)
    removed = services("history").prune(idle)
    click.echo(f"deleted {removed} conversations with no activity for {days} days")


@click.command("usage")
@click.option("--since", default="30d", show_default=True,
              help="From this date (YYYY-MM-DD), or this many days back (30d); today included.")
@click.option("--user", help="Only this user.")
@click.option("--format", "output", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@with_appcontext
@plain_failures
def usage_command(since, user, output):
    """Tokens and turns per user and model, for the operator."""
    start = since_option(since)
    until = today()
    rows = per_user(usage(start, until, user))
    if output == "json":
        click.echo(json.dumps({"since": start.isoformat(), "until": until.isoformat(), "users": rows}))
        return
    columns = ["user", "model", "turns", "prompt_tokens", "completion_tokens", "estimated_turns"]
    if output == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[row[c] for c in columns] for row in rows])
        return
    widths = [max([len(c)] + [len(str(row[c])) for row in rows]) for c in columns]
    for line in [columns] + [[row[c] for c in columns] for row in rows]:
        click.echo("  ".join(str(value).ljust(width) for value, width in zip(line, widths)).rstrip())


def since_option(since):
    """The date --since names: YYYY-MM-DD, or N days back (Nd)."""
    found = re.fullmatch(r"(\d{1,4})d", since)
    if found:
        return days_ago(int(found.group(1)))
    try:
        return datetime.date.fromisoformat(since)
    except ValueError:
        raise click.BadParameter("a date (YYYY-MM-DD) or a number of days (30d)", param_hint="--since") from None
