"""Databases of a test module's own, cloned from the suite's migrated template."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from psycopg.conninfo import make_conninfo
from pytest_postgresql.janitor import DatabaseJanitor

__all__ = ["cloned_database"]


@contextlib.contextmanager
def cloned_database(template: Any, name: str) -> Iterator[str]:
    """A database of its own, cloned from the migrated template; for module-scoped
    fixtures (the `dsn` fixture gives each test a fresh one)."""
    janitor = DatabaseJanitor(
        user=template.user, host=template.host, port=template.port,
        password=template.password, dbname=name, template_dbname=template.template_dbname,
    )  # fmt: skip
    janitor.drop()
    with janitor:
        yield make_conninfo(
            host=template.host, port=template.port, user=template.user, dbname=name,
            password=template.password or None,
        )  # fmt: skip
