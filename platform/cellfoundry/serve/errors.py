"""Request errors and the guard every route runs in (4xx for bad input, 500 otherwise)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from typing import Any

from fastapi.responses import JSONResponse

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A bad request: ``status`` (4xx), a one-line ``message`` and JSON-ready ``details``."""

    def __init__(self, status: int, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details

    def body(self) -> dict[str, Any]:
        """The JSON error body: ``{"error": message, **details}``."""
        return {"error": self.message, **self.details}


async def guard(work: Awaitable[dict[str, Any]]) -> JSONResponse:
    """Run a route: its result as 200, a :class:`RequestError` as its 4xx, anything else 500."""
    try:
        return JSONResponse(await work)
    except RequestError as exc:
        return JSONResponse(exc.body(), status_code=exc.status)
    except Exception as exc:  # a failing request must never take the API down
        logger.exception("request failed")
        return JSONResponse(
            {"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500
        )
