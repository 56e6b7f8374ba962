"""The SQL a reader opens: every function and view defined once, in its stream's
functions.sql, and the database holding exactly those definitions."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import psycopg

from pgleader.migrations import installed_streams
from pgleader.sqlfiles import sql_dir

ROOT = Path(__file__).resolve().parents[2]
_CREATES = re.compile(
    r"^\s*create\s+(?:or\s+replace\s+)?(function|procedure|view|materialized\s+view)\s+"
    r"([a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*)",
    re.IGNORECASE | re.MULTILINE,
)
_DEFINITIONS = """
select n.nspname || '.' || p.proname, pg_get_functiondef(p.oid)
  from pg_proc p join pg_namespace n on n.oid = p.pronamespace
 where n.nspname in ('pgleader', 'gateway')
union all
select n.nspname || '.' || c.relname, pg_get_viewdef(c.oid)
  from pg_class c join pg_namespace n on n.oid = c.relnamespace
 where n.nspname in ('pgleader', 'gateway') and c.relkind in ('v', 'm')
 order by 1
"""


def schema_files() -> list[Path]:
    """Every file that may define schema objects: migrations, functions, the role script."""
    return sorted(p for p in sql_dir().rglob("*.sql") if p.name != "queries.sql")


def defined_in() -> dict[str, list[str]]:
    """function or view -> the files that create it (relative to sql/)."""
    where: dict[str, list[str]] = defaultdict(list)
    for path in schema_files():
        for _, name in _CREATES.findall(path.read_text()):
            where[name.lower()].append(str(path.relative_to(sql_dir())))
    return dict(where)


def test_every_function_and_view_is_defined_once_in_its_streams_functions_file():
    where = defined_in()
    assert len(where) > 20
    streams = {s.name: s.directory for s in installed_streams()}
    for name, files in where.items():
        schema = name.split(".")[0]
        home = str((streams[schema] / "functions.sql").relative_to(sql_dir()))
        assert files == [home], f"{name} is created in {files}, not once in {home}"


def test_the_database_holds_exactly_the_definitions_of_the_functions_files(dsn):
    with psycopg.connect(dsn, autocommit=True) as conn:
        before = conn.execute(_DEFINITIONS).fetchall()
        assert {name for name, _ in before} == set(defined_in())
        # Applying the functions files again changes nothing: they are what is there.
        for stream in installed_streams():
            conn.execute((stream.directory / "functions.sql").read_bytes())
        assert conn.execute(_DEFINITIONS).fetchall() == before


def test_each_rule_of_an_order_is_written_once():
    """The client order id format and the side a signal trades: one SQL function each."""
    sources = [*schema_files(), *(ROOT / "service").rglob("*.py")]
    for rule, home in (
        ("'pgl-", "gateway.next_client_order_id"),
        ("else 'SELL'", "gateway.order_action"),
    ):
        found = [p for p in sources for _ in range(p.read_text().count(rule))]
        assert found == [sql_dir() / "gateway" / "functions.sql"], (rule, found)
        assert home in defined_in()
