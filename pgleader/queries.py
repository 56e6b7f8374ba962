"""Named SQL: every statement the code runs is read by name from a `.sql` file.

A queries file is a run of blocks, each opened by a header line:

    -- name: heartbeat
    -- True while this session holds the lock and its epoch is current.
    select pgleader.heartbeat(%s, %s, %s);

The comment lines right after the header say what the query is for; the
statement runs to the next header. What the code gets is the statement alone:
its leading comments, trailing comments and blank lines, and one final `;` are
cut off. Values are psycopg placeholders, never text put into the statement.

A file is parsed once (cached). A duplicate name, a statement without a name or
an empty query fails the load; asking for an unknown name fails too, so modules
look their queries up at import time and a typo never waits for its code path.
A package built on pgleader reads its own file with the same loader:
`load_queries(path)`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import LiteralString

from pgleader.errors import QueryError
from pgleader.sqlfiles import sql_dir

__all__ = ["QUERIES", "Queries", "load_queries", "parse_queries"]

_HEADER = re.compile(r"^--\s*name:(.*)$")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Queries:
    """The named statements of one file: ``queries["heartbeat"]`` is its text."""

    def __init__(self, source: str, statements: dict[str, LiteralString]) -> None:
        self.source = source
        self._statements = statements

    def __getitem__(self, name: str) -> LiteralString:
        try:
            return self._statements[name]
        except KeyError:
            raise QueryError(
                f"no query named {name!r} in {self.source}; add a `-- name: {name}` block there"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._statements

    def __iter__(self) -> Iterator[str]:
        return iter(self._statements)

    def __len__(self) -> int:
        return len(self._statements)

    def __repr__(self) -> str:
        return f"<Queries {self.source}: {len(self)} queries>"


def parse_queries(text: str, source: str = "<string>") -> dict[str, LiteralString]:
    """name -> statement of a queries file's text; raises QueryError on a bad file."""
    blocks: dict[str, tuple[int, list[str]]] = {}
    current: list[str] | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line.strip())
        if header:
            name = header.group(1).strip()
            if not _NAME.match(name):
                raise QueryError(
                    f"{source}:{number}: query name {name!r} is not lower_case_with_underscores"
                )
            if name in blocks:
                raise QueryError(
                    f"{source}:{number}: query {name!r} is defined twice"
                    f" (first at line {blocks[name][0]}); give one of them another name"
                )
            current = []
            blocks[name] = (number, current)
        elif current is not None:
            current.append(line)
        elif line.strip() and not line.lstrip().startswith("--"):
            raise QueryError(
                f"{source}:{number}: a statement before any `-- name:` header; name it"
            )
    statements: dict[str, LiteralString] = {}
    for name, (number, lines) in blocks.items():
        statement = _statement(lines)
        if not statement:
            raise QueryError(f"{source}:{number}: query {name!r} has no statement")
        statements[name] = statement  # ships with the code, takes no input: a literal
    return statements


def _statement(lines: list[str]) -> str:
    """A block's statement: without its comment lines before and after, and one final `;`."""

    def comment_or_blank(line: str) -> bool:
        return not line.strip() or line.lstrip().startswith("--")

    start, end = 0, len(lines)
    while start < end and comment_or_blank(lines[start]):
        start += 1
    while end > start and comment_or_blank(lines[end - 1]):
        end -= 1
    statement = "\n".join(lines[start:end]).strip()
    return statement.removesuffix(";").rstrip()


@functools.cache
def load_queries(path: Path) -> Queries:
    """The queries of `path`, parsed once per process."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QueryError(f"cannot read the queries file {path}: {exc.strerror}") from exc
    return Queries(str(path), parse_queries(text, str(path)))


# The library's own statements.
QUERIES = load_queries(sql_dir() / "pgleader" / "queries.sql")
