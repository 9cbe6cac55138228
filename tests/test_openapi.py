"""The OpenAPI document: it names every route the app has, and the running service keeps to it."""

import ast
import json
import os
import re
import subprocess
import sys

import jsonschema_rs
import pytest
import requests

from config import VERSION
from errors import ApiError
from tests.fake_llm import Script
from tests.helpers import ROOT, token
from tests.sse_client import data_events
from turns import final_data, final_metrics

UNDOCUMENTED_METHODS = {"HEAD", "OPTIONS"}
# The chat page (web.py) and its files are not part of the API.
PAGE_ENDPOINTS = ("static", "web.")


def document():
    """The OpenAPI document kept in the repository."""
    with open(os.path.join(ROOT, "openapi.json")) as kept:
        return json.load(kept)


def documented_operations():
    """(method, path) of every operation in the document."""
    return {(method.upper(), path) for path, item in document()["paths"].items()
            for method in item if method != "parameters"}


def routed_operations(app):
    """(method, path) of every route the app serves, in OpenAPI's path syntax."""
    return {(method, re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule))
            for rule in app.url_map.iter_rules() if not rule.endpoint.startswith(PAGE_ENDPOINTS)
            for method in rule.methods - UNDOCUMENTED_METHODS}


def test_document_names_exactly_the_routes_the_app_has(pg_app):
    """Every route is documented and every documented operation is routed."""
    assert routed_operations(pg_app) == documented_operations()


def test_document_is_openapi_3_1_of_this_version():
    """The document declares OpenAPI 3.1 and the service's version."""
    assert document()["openapi"].startswith("3.1")
    assert document()["info"]["version"] == VERSION


def test_every_operation_documents_its_errors_in_the_one_shape():
    """Each authenticated operation documents 401, and every error response uses the Error schema."""
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            secured = operation.get("security", document()["security"]) != []
            assert not secured or "401" in operation["responses"], (method, path)
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)


def component(name):
    """A validator of the document's schema `name` (its references resolved in the document)."""
    return jsonschema_rs.validator_for({"$ref": f"#/components/schemas/{name}", "components": document()["components"]})


def test_a_final_event_whose_figures_are_unknown_keeps_to_the_document():
    """The final event of a recovered turn or of a failure: every figure null, and still a StreamFinal."""
    final = json.loads(final_data("c1", "error", final_metrics(), ApiError()))
    component("StreamFinal").validate(final)


@pytest.mark.parametrize("script", [Script(chunks=["a", "b"]), Script(chunks=["a", "b"], break_after=1)],
                         ids=["complete", "broken-off"])
def test_a_streamed_turns_events_keep_to_the_document(service, llm, script):
    """Every chunk is a StreamChunk and the last event a StreamFinal, for a turn that ends well or not."""
    llm.script(script)
    with service.stream("hi", "c1") as response:
        received = data_events(response)
    for chunk in received[:-1]:
        component("StreamChunk").validate(chunk)
    component("StreamFinal").validate(received[-1])


def test_service_serves_the_document(service):
    """GET /openapi.json answers the kept document without a token."""
    response = requests.get(service.url + "/openapi.json", timeout=5)
    assert response.status_code == 200
    assert response.json() == document()


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_response_off_the_document(service, llm):
    """Generated requests, valid and not, with a valid token: no 5xx, every response as documented."""
    command = [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run",
               service.url + "/openapi.json", "--header", f"Authorization: Bearer {token('schemathesis')}",
               "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
               "response_schema_conformance", "--max-examples", "25", "--seed", "1",
               "--generation-allow-x00", "false", "--request-timeout", "10"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def error_codes():
    """Every error code the service's own modules can answer with: the kinds' `code`, the codes given to ApiError,
    and the codes of HTTP statuses (`..._CODES` tables and their fallback)."""
    codes = set()
    for name in os.listdir(ROOT):
        if not name.endswith(".py") or name.count(".") != 1:
            continue
        with open(os.path.join(ROOT, name)) as source:
            tree = ast.parse(source.read())
        for node in ast.walk(tree):
            codes |= codes_in(node)
    return codes


def codes_in(node):
    """The error codes one piece of syntax names (see error_codes)."""
    if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.endswith("_CODES") for t in node.targets):
        return {value.value for value in node.value.values}
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], (ast.Name, ast.Tuple)):
        names = [t.id for t in getattr(node.targets[0], "elts", node.targets) if isinstance(t, ast.Name)]
        values = getattr(node.value, "elts", [node.value])
        return {v.value for n, v in zip(names, values) if n == "code" and isinstance(v, ast.Constant)}
    if isinstance(node, ast.Call):
        called = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
        given = [k.value for k in node.keywords if k.arg == "code"]
        if called == "ApiError" and len(node.args) >= 2:
            given.append(node.args[1])
        if called == "get" and getattr(node.func.value, "id", "").endswith("_CODES"):
            given.append(node.args[1])
        return {g.value for g in given if isinstance(g, ast.Constant) and isinstance(g.value, str)}
    return set()


def readme_error_table():
    """The README's table of errors."""
    with open(os.path.join(ROOT, "README.md")) as readme:
        text = readme.read()
    return text.split("### Errors", 1)[1].split("\n## ", 1)[0]


def test_every_error_code_the_service_answers_is_documented():
    """Each code the code can produce is in the README's error table and in the OpenAPI document's list of codes."""
    codes = error_codes()
    assert {"internal_error", "llm_incomplete", "shutting_down", "turn_taken_over"} <= codes  # the search works
    assert {code for code in codes if f"`{code}`" not in readme_error_table()} == set()
    documented = document()["components"]["schemas"]["ErrorDetail"]["properties"]["code"].get("enum", [])
    assert codes - set(documented) == set()
    assert set(documented) - codes == set()
