"""The plain way: the specification's two endpoints and nothing else, written plainly on the same stack
(Flask, flask-jwt-extended, redis-py, Peewee on PostgreSQL, requests, gunicorn's gevent worker).

bench/run.py runs it beside the service, as a variant, to tell what the stack costs on the machine at
hand when used the usual way. It is not the product: it has no ownership, limits, resuming, journal,
metrics, masking or error handling. FLOOR=bare serves bare.py instead, the least a turn can cost.
"""

import datetime
import json
import os

import redis
import requests
from flask import Flask, Response, jsonify, request
from flask_jwt_extended import JWTManager, get_jwt_identity, jwt_required
from peewee import CharField, DateTimeField, Model, TextField
from playhouse.db_url import parse
from playhouse.pool import PooledPostgresqlDatabase
from requests.adapters import HTTPAdapter

database = PooledPostgresqlDatabase(None)
RECENT = 20
REDIS_CONNECTIONS = 50
MODEL_CONNECTIONS = 4096


class FloorMessage(Model):
    """One message of a conversation."""

    conversation_id = CharField(index=True)
    role = CharField()
    content = TextField()
    created_at = DateTimeField()

    class Meta:
        database = database


def create_app():
    """The app, configured from the environment as the service is; with FLOOR=bare, the bare minimum (bare.py)."""
    if os.environ.get("FLOOR") == "bare":
        import bare

        return bare.create_app()
    settings = parse(os.environ["DATABASE_URL"])
    database.init(settings.pop("database"), max_connections=10, stale_timeout=300, timeout=10, **settings)
    app = Flask(__name__)
    app.config["JWT_SECRET_KEY"] = os.environ["JWT_SECRET_KEY"]
    JWTManager(app)
    # As many connections as the service keeps (redis-py's own pool fails past 100; requests' keeps 10).
    cache = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
        os.environ["REDIS_URL"], max_connections=REDIS_CONNECTIONS, timeout=10))
    model_url = os.environ["LLM_BASE_URL"].rstrip("/") + "/chat/completions"
    model = os.environ["LLM_MODEL"]
    session = requests.Session()
    session.mount("http://", HTTPAdapter(pool_maxsize=MODEL_CONNECTIONS))

    def recent(key):
        """The conversation's recent messages from Redis."""
        return [json.loads(item) for item in cache.lrange(key, -RECENT, -1)]

    def keep(key, conversation_id, message, reply):
        """Both messages into Redis and, in one transaction, into the database."""
        pair = [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
        with cache.pipeline(transaction=False) as pipe:
            pipe.rpush(key, *[json.dumps(item) for item in pair])
            pipe.ltrim(key, -RECENT, -1)
            pipe.execute()
        now = datetime.datetime.now(datetime.UTC)
        with database.connection_context(), database.atomic():
            FloorMessage.insert_many([{"conversation_id": conversation_id, "role": item["role"],
                                       "content": item["content"], "created_at": now} for item in pair]).execute()

    def asked():
        """The turn's message, conversation, Redis key and what to send the model."""
        body = request.get_json()
        conversation_id = body["conversation_id"]
        key = f"floor:{get_jwt_identity()}:{conversation_id}"
        messages = recent(key) + [{"role": "user", "content": body["message"]}]
        return body["message"], conversation_id, key, messages

    @app.get("/status")
    def status():
        """Up."""
        return jsonify(status="ok")

    @app.post("/chat/run")
    @jwt_required()
    def run():
        """One turn, answered whole."""
        message, conversation_id, key, messages = asked()
        answer = session.post(model_url, json={"model": model, "messages": messages, "stream": False}, timeout=60)
        reply = answer.json()["choices"][0]["message"]["content"]
        keep(key, conversation_id, message, reply)
        return jsonify(response=reply, conversation_id=conversation_id)

    @app.post("/chat/stream")
    @jwt_required()
    def stream():
        """One turn, answered as server-sent events."""
        message, conversation_id, key, messages = asked()
        answer = session.post(model_url, json={"model": model, "messages": messages, "stream": True,
                                               "stream_options": {"include_usage": True}}, stream=True, timeout=60)

        def events():
            """One event per piece of the reply, then the final one."""
            pieces = []
            for line in answer.iter_lines(chunk_size=None):
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                choices = json.loads(line[6:])["choices"]
                content = choices[0]["delta"].get("content") if choices else None
                if content:
                    pieces.append(content)
                    yield f"data: {json.dumps({'content': content, 'is_final': False, 'metrics': None})}\n\n"
            keep(key, conversation_id, message, "".join(pieces))
            yield f"data: {json.dumps({'content': '', 'is_final': True, 'metrics': None})}\n\n"

        return Response(events(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.cli.command("init-db")
    def init_db():
        """Create the table."""
        with database.connection_context():
            database.create_tables([FloorMessage])

    return app
