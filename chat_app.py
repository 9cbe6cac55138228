"""The chat API: the application factory, the /chat blueprint, error handlers and CLI commands."""

import datetime
import logging
import os
import re
import secrets

import click
import jwt
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from flask.cli import with_appcontext
from flask_jwt_extended import JWTManager, create_access_token, get_jwt_identity, verify_jwt_in_request
from flask_jwt_extended.exceptions import JWTExtendedException
from werkzeug.exceptions import HTTPException

import cache
import models
from config import INSTANCE_DIR, Config
from errors import ApiError
from llm import make_model
from turns import ChatService, new_conversation_id, stored

log = logging.getLogger("chat_app")

CONVERSATION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MIN_SECRET_BYTES = 32
HTTP_CODES = {400: "invalid_request", 401: "unauthorized", 404: "not_found",
              405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}

chat = Blueprint("chat", __name__, url_prefix="/chat")
status = Blueprint("status", __name__)


def create_app(test_config=None):
    """Build the app from the environment (or `test_config`) and wire its services."""
    app = Flask(__name__, instance_path=INSTANCE_DIR)
    app.config.from_mapping(Config().as_dict())
    if test_config:
        app.config.from_mapping(test_config)
    configure_logging()
    configure_tokens(app)
    models.open_database(app.config["DATABASE_URL"], app.config["DATABASE_POOL_SIZE"],
                         app.config["DATABASE_POOL_TIMEOUT"])
    model = make_model(app.config)
    app.extensions["chat"] = ChatService(
        model, cache.make_cache(app.config["REDIS_URL"], app.config["CACHE_TTL_SECONDS"]),
        app.config["CHAT_HISTORY_LIMIT"], app.config["LLM_SYSTEM_PROMPT"],
        app.config["SSE_HEARTBEAT_SECONDS"], lock_ttl=app.config["LLM_TIMEOUT_SECONDS"] + 30)
    app.register_blueprint(chat)
    app.register_blueprint(status)
    app.register_error_handler(ApiError, api_error)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)
    app.cli.add_command(init_db_command)
    app.cli.add_command(create_token_command)
    log.info("model backend: %s", describe_model(model))
    return app


def configure_logging():
    """Log to stderr at LOG_LEVEL unless something (gunicorn, pytest) already set logging up."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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
    try:
        verify_jwt_in_request()
        user = get_jwt_identity()
    except jwt.ExpiredSignatureError:
        raise ApiError(401, "unauthorized", "the token has expired") from None
    except (JWTExtendedException, jwt.PyJWTError) as exc:
        missing = "Missing Authorization Header" in str(exc)
        message = "send a bearer token: Authorization: Bearer <token>" if missing else "the token is not valid"
        raise ApiError(401, "unauthorized", message) from None
    if not isinstance(user, str) or not user:
        raise ApiError(401, "unauthorized", "the token has no subject")
    return user


def chat_request():
    """The validated (message, conversation_id) of a chat request body."""
    if not request.is_json:
        raise ApiError(415, "unsupported_media_type", "send a JSON body with Content-Type: application/json")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "the body must be a JSON object")
    return valid_message(body.get("message")), valid_conversation_id(body.get("conversation_id"))


def valid_message(message):
    """The message, if it is a non-empty string the database can keep."""
    if not isinstance(message, str) or not message.strip():
        raise ApiError(400, "invalid_request", "message must be a non-empty string")
    limit = current_app.config["MAX_MESSAGE_CHARS"]
    if len(message) > limit:
        raise ApiError(413, "too_large", f"message must be at most {limit} characters")
    if "\x00" in message:
        raise ApiError(400, "invalid_request", "message must not contain NUL characters")
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "invalid_request", "message must be valid Unicode (no lone surrogates)") from None
    return message


def valid_conversation_id(conversation_id):
    """The conversation id, or a new one when none is given."""
    if conversation_id is None:
        return new_conversation_id()
    if not isinstance(conversation_id, str) or not CONVERSATION_ID.fullmatch(conversation_id):
        raise ApiError(400, "invalid_request",
                       "conversation_id must be 1 to 128 letters, digits, '-', '_', '.' or ':'")
    return conversation_id


@chat.post("/run")
def run():
    """Answer a chat turn in one JSON reply."""
    user = authenticated_user()
    message, conversation_id = chat_request()
    reply = current_app.extensions["chat"].run(user, conversation_id, message)
    return jsonify(response=reply, conversation_id=conversation_id)


@chat.post("/stream")
def stream():
    """Answer a chat turn as server-sent events."""
    user = authenticated_user()
    message, conversation_id = chat_request()
    events = current_app.extensions["chat"].stream(user, conversation_id, message)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
               "Connection": "keep-alive", "X-Conversation-Id": conversation_id}
    return Response(events, mimetype="text/event-stream", headers=headers)


@status.get("/status")
def service_status():
    """Say the service is up, and how its database, cache and model are."""
    service = current_app.extensions["chat"]
    database = state_of(database_round_trip)
    cache_state = state_of(service.cache.ping)
    return jsonify(status="ok" if database == cache_state == "ok" else "degraded",
                   database={"state": database, "backend": models.backend_name()},
                   cache={"state": cache_state, "backend": service.cache.backend},
                   model=service.model.describe())


def database_round_trip():
    """Run the cheapest query there is."""
    with stored():
        models.db.execute_sql("SELECT 1")


def state_of(check):
    """'ok' if `check` succeeds, else 'unavailable'."""
    try:
        check()
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is what /status reports
        log.warning("status check failed: %s", type(exc).__name__)
        return "unavailable"


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
@with_appcontext
def create_token_command(user, expires_in):
    """Print an access token for USER."""
    expires = datetime.timedelta(seconds=expires_in) if expires_in > 0 else False
    click.echo(create_access_token(identity=user, expires_delta=expires))
