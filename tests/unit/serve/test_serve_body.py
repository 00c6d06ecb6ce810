"""Request bodies: byte limits before reading, JSON depth and number limits, named fields."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.requests import Request

from cellfoundry.serve.body import MAX_DEPTH, content_length, parse_json, read_body
from cellfoundry.serve.errors import RequestError


def _error(call: Any) -> RequestError:
    with pytest.raises(RequestError) as info:
        call()
    return info.value


def test_content_length() -> None:
    assert content_length(None, 10) is None
    assert content_length(" 10 ", 10) == 10
    for bad in ("abc", "-1", "1e3", "", "9" * 40, "１２"):
        assert _error(lambda b=bad: content_length(b, 10)).status == 400, bad
    too_big = _error(lambda: content_length(str(300 * 1024**2), 4096))
    assert too_big.status == 413 and "4096" in too_big.message


class _Receiver:
    """An ASGI ``receive`` that hands out ``n`` chunks and counts what was taken."""

    def __init__(self, chunk: bytes, n: int) -> None:
        self.chunk, self.n, self.taken = chunk, n, 0

    async def __call__(self) -> dict[str, Any]:
        self.taken += 1
        return {"type": "http.request", "body": self.chunk, "more_body": self.taken < self.n}


def _request(headers: dict[str, str], receive: _Receiver) -> Request:
    scope = {
        "type": "http", "method": "POST", "path": "/embed", "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }  # fmt: skip
    return Request(scope, receive)


def test_read_body_refuses_from_content_length_before_reading() -> None:
    receive = _Receiver(b"x" * 1024, 300_000)
    req = _request({"content-length": str(300 * 1024**2)}, receive)
    error = _error(lambda: asyncio.run(read_body(req, 4096)))
    assert error.status == 413 and receive.taken == 0


def test_read_body_stops_a_stream_at_the_limit() -> None:
    receive = _Receiver(b"x" * 1024, 1_000_000)  # a 1 GB chunked body
    error = _error(lambda: asyncio.run(read_body(_request({}, receive), 8 * 1024)))
    assert error.status == 413 and receive.taken == 9  # the chunk that passed the limit
    ok = _Receiver(b"{}", 3)
    assert asyncio.run(read_body(_request({"content-length": "6"}, ok), 8)) == b"{}{}{}"


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "JSON object"),
        (b"\xff\xfe{", "malformed JSON"),
        ('{"genes": {"CD3E": NaN}}', "NaN"),
        ('{"genes": {"CD3E": -Infinity}}', "Infinity"),
        ('{"genes": {"CD3E": 1e400}}', "'genes.CD3E'"),
        ('{"input_ids": [2, 100000000000000000000000000000]}', "'input_ids[1]'"),
        ('{"input_ids": [2, 9223372036854775808]}', "'input_ids[1]'"),
        ('{"input_ids": [2, ' + "9" * 5000 + "]}", "5000 digits"),
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested"),
        ('{"a": ' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}", "nested"),
        ('{"p": [{"genes": [[1, ' + "9" * 30 + "]]}]}", "'p[0].genes[0][1]'"),
    ],
)
def test_parse_json_rejects_with_400(raw: str | bytes, needle: str) -> None:
    error = _error(lambda: parse_json(raw.encode() if isinstance(raw, str) else raw))
    assert error.status == 400 and needle in error.message, error.message


def test_parse_json_accepts_the_api_shapes() -> None:
    body = {
        "genes": {"CD3E": 4, "ENSG00000163736": 2.5}, "normalized": True,
        "input_ids": [2, 9223372036854775807, -(2**63)], "fraction": 0.25,
        "perturbations": [{"type": "delete", "genes": ["CD3E"]}], "x": None,
    }  # fmt: skip
    assert parse_json(json.dumps(body).encode()) == body
    deepest = '{"a": ' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}"
    assert parse_json(deepest.encode())["a"]
