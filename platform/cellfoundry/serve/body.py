"""Request bodies: read within a byte limit, parse as JSON within depth and number limits.

Every problem is a :class:`~cellfoundry.serve.errors.RequestError`: 400 for a body that is
not acceptable JSON (malformed, ``NaN`` / ``Infinity``, nested deeper than
:data:`MAX_DEPTH`, an integer outside int64, a float outside float64; the error names the
field, e.g. ``input_ids[1]``) or a ``Content-Length`` that is not a byte count; 413 for a
body over the limit, refused from its ``Content-Length`` before any byte is read, or as soon
as a streamed (chunked) body passes the limit.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from starlette.requests import Request

from cellfoundry.serve.errors import RequestError

logger = logging.getLogger(__name__)

MAX_DEPTH = 8
"""Deepest nesting of objects / arrays a body may have (the API needs 4:
body -> ``perturbations`` -> a perturbation -> its ``genes``)."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_MAX_INT_DIGITS = 20  # longer integer literals are never parsed (int64 has 19 digits)


def content_length(value: str | None, limit: int) -> int | None:
    """The declared body size (None when not sent); 400 if it is not a byte count, 413 if
    it exceeds ``limit``."""
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise RequestError(400, f"Content-Length {value[:40]!r} is not a byte count")
    size = int(text)
    if size > limit:
        raise RequestError(413, f"body of {size} bytes; at most {limit} bytes are accepted")
    return size


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) from ``Content-Length`` before reading it, or while a
    body without one streams in, as soon as it passes ``limit`` bytes."""
    content_length(request.headers.get("content-length"), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(
                413, f"body of more than {limit} bytes; at most {limit} bytes are accepted"
            )
        chunks.append(chunk)
    return b"".join(chunks)


class _Unrepresentable:
    """A number literal the API cannot hold; reported with its field by :func:`parse_json`."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _parse_int(text: str) -> int | _Unrepresentable:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        return _Unrepresentable(
            f"an integer of {len(text.lstrip('-'))} digits, outside the 64-bit range"
        )
    return int(text)


def _parse_float(text: str) -> float | _Unrepresentable:
    value = float(text)
    if not math.isfinite(value):
        return _Unrepresentable(f"the number {text[:40]} is outside the float64 range")
    return value


def _parse_constant(name: str) -> Any:
    raise RequestError(400, f"malformed JSON: {name} is not a JSON number (send finite numbers)")


def parse_json(raw: bytes, *, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """Parse a request body into a JSON object, every number representable (ints in int64,
    floats finite) and nothing nested deeper than ``max_depth``; else a 400 naming the field."""
    try:
        body = json.loads(
            raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant
        )
    except RecursionError:
        raise RequestError(
            400, f"malformed JSON: nested deeper than {max_depth} levels of objects / arrays"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    _check_tree(body, max_depth)
    return body


def _check_tree(body: dict[str, Any], max_depth: int) -> None:
    """Walk the parsed body once (iteratively): depth, int64 range, unrepresentable numbers."""
    stack: list[tuple[Any, int, str]] = [(body, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > max_depth:
            raise RequestError(
                400,
                f"malformed JSON: nested deeper than {max_depth} levels of objects / arrays "
                f"(at {path or 'the top'})",
            )
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            kind = type(value)
            if kind is str or kind is float or kind is bool or value is None:
                continue
            if kind is int:
                if INT64_MIN <= value <= INT64_MAX:
                    continue
                reason = "an integer outside the 64-bit range"
            elif kind is _Unrepresentable:
                reason = value.reason
            else:  # dict or list
                stack.append((value, depth + 1, _child(path, node, key)))
                continue
            field = _child(path, node, key)
            raise RequestError(400, f"'{field}' holds {reason}", field=field)


def _child(path: str, node: Any, key: Any) -> str:
    if isinstance(node, dict):
        name = key if len(key) <= 40 else key[:40] + "..."
        return f"{path}.{name}" if path else name
    return f"{path}[{key}]"
