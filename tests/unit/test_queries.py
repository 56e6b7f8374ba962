"""The named-query loader: what a queries file may hold, and how it fails.

That the code uses every query, by a name the file has, with parameters only, is
proved by tests/gateway/test_security.py.
"""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path

import pytest

import pgleader.queries
import service.queries
from pgleader.errors import PgLeaderError, QueryError
from pgleader.queries import load_queries, parse_queries

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "queries.sql"
    path.write_text(textwrap.dedent(text))
    return path


def test_a_query_is_its_statement_without_comments_or_final_semicolon():
    queries = parse_queries(
        textwrap.dedent(
            """
            -- What this file is for.

            -- name: pending
            -- Pending rows, oldest first.
            select id from t
             where status = 'pending'  -- not 'done'
             order by at limit %s;

            -- A section header ----------------------------------------------

            -- name: ping
            select 1
            """
        )
    )
    assert queries == {
        "pending": "select id from t\n where status = 'pending'  -- not 'done'\n order by at limit %s",
        "ping": "select 1",
    }


def test_a_duplicate_name_fails_the_load_naming_both_lines(tmp_path):
    path = write(
        tmp_path,
        """
        -- name: heartbeat
        select 1;

        -- name: heartbeat
        select 2;
        """,
    )
    with pytest.raises(QueryError) as failed:
        load_queries(path)
    message = str(failed.value)
    assert f"{path}:5" in message and "'heartbeat' is defined twice" in message
    assert "first at line 2" in message


def test_an_unknown_name_fails_saying_which_file_lacks_it(tmp_path):
    queries = load_queries(write(tmp_path, "-- name: ping\nselect 1;\n"))
    assert queries["ping"] == "select 1"
    with pytest.raises(QueryError, match=r"no query named 'pong' in .*queries\.sql") as failed:
        queries["pong"]
    assert isinstance(failed.value, PgLeaderError)
    assert "pong" not in queries and list(queries) == ["ping"] and len(queries) == 1


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("select 1;\n-- name: ping\nselect 1;\n", r":1: a statement before any `-- name:` header"),
        ("-- name: ping\n-- only a comment\n\n-- name: pong\nselect 1;\n", r":1: query 'ping' has no statement"),
        ("-- name: Ping-Pong\nselect 1;\n", r":1: query name 'Ping-Pong' is not lower_case"),
        ("-- name:\nselect 1;\n", r":1: query name '' is not lower_case"),
    ],
)  # fmt: skip
def test_a_malformed_file_fails_the_load_at_its_line(text, complaint):
    with pytest.raises(QueryError, match=complaint):
        parse_queries(text, "q.sql")


def test_a_missing_file_fails_clearly(tmp_path):
    with pytest.raises(QueryError, match=r"cannot read the queries file .*absent\.sql"):
        load_queries(tmp_path / "absent.sql")


def test_a_file_is_parsed_once(tmp_path):
    path = write(tmp_path, "-- name: ping\nselect 1;\n")
    first = load_queries(path)
    path.write_text("-- name: pong\nselect 2;\n")
    assert load_queries(path) is first


def test_the_library_and_the_gateway_each_read_their_own_file():
    library, gateway = pgleader.queries.QUERIES, service.queries.QUERIES
    assert Path(library.source).parts[-2:] == ("pgleader", "queries.sql")
    assert Path(gateway.source).parts[-2:] == ("gateway", "queries.sql")
    assert "heartbeat" in library and "claim_signals" in gateway
    assert not set(library) & set(gateway)  # a name says which file it comes from


def test_the_queries_files_ship_in_the_wheel_where_sql_dir_looks():
    """pyproject force-includes sql/ as pgleader/sql, the first place sql_dir() tries."""
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    assert build["targets"]["wheel"]["force-include"]["sql"] == "pgleader/sql"
    for stream in ("pgleader", "gateway"):
        assert (ROOT / "sql" / stream / "queries.sql").is_file()
