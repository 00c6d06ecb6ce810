"""A logging handler that collects the records reaching one logger, for tests."""

from __future__ import annotations

import logging


class Collect(logging.Handler):
    """The records that reach one logger (whatever pytest or setup_logging did to others);
    a context manager that sets the logger to INFO while it collects."""

    def __init__(self, name: str) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Collect:
        self.level_before = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]
