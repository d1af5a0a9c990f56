"""Bodies as clients really send them, through nginx: curl's default content type, bytes
that are not UTF-8, JSON nested past the parser's depth, booleans spelled as strings.
Each must get the error envelope with a status and code that say what is wrong."""

from __future__ import annotations

import httpx
import pytest

from service_helpers import assert_error

CHAT = b'{"message": "What is a tardigrade?"}'


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_body_not_sent_as_json_is_415_naming_the_content_type(
    client: httpx.Client, path: str, content_type: str | None
) -> None:
    # What `curl -d '{...}' URL` sends (form-urlencoded), or a client that sets nothing.
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(path, content=CHAT, headers=headers)
    assert "content-type" in response.request.headers or content_type is None
    assert_error(response, 415, "unsupported_media_type")
    assert "application/json" in response.json()["error"]["message"]
    assert (content_type or "no Content-Type") in response.json()["error"]["message"]


def test_json_with_a_charset_or_a_json_suffix_is_json(client: httpx.Client) -> None:
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json"):
        response = client.post(
            "/api/chat",
            content=b'{"message": "x", "top_k": "many"}',
            headers={"content-type": content_type},
        )
        # Parsed as JSON, so judged on its fields.
        assert_error(response, 422, "invalid_request")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"message": "caf\xe9"}', id="latin-1 byte"),
        pytest.param(b'{"message": "\xff\xfe"}', id="invalid bytes"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested 100k deep"),
        pytest.param(
            b'{"message": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_001, id="nested objects"
        ),
    ],
)
@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_undecodable_json_is_invalid_json(client: httpx.Client, path: str, body: bytes) -> None:
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_json")


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, "off"])
def test_stream_must_be_a_json_boolean(client: httpx.Client, value: object) -> None:
    body = {"model": "ragline", "messages": [{"role": "user", "content": "hi"}], "stream": value}
    response = client.post("/v1/chat/completions", json=body)
    assert_error(response, 422, "invalid_request")
    assert "stream" in response.json()["error"]["message"]


def test_stream_options_include_usage_must_be_a_boolean(client: httpx.Client) -> None:
    body = {
        "model": "ragline",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": "yes"},
    }
    assert_error(client.post("/v1/chat/completions", json=body), 422, "invalid_request")


def test_a_trailing_slash_is_404_not_a_redirect(client: httpx.Client) -> None:
    # A redirect built by the gateway behind nginx named the wrong host; an API says 404.
    for path in ("/v1/models/", "/api/jobs/"):
        response = client.get(path, follow_redirects=False)
        assert_error(response, 404, "not_found")
