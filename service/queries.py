"""The gateway's named SQL (sql/gateway/queries.sql), read with pgleader's loader.

Look queries up at import time (``_CLAIM = QUERIES["claim_signals"]``), so that a
name missing from the file fails when the module loads, not on its code path.
"""

from __future__ import annotations

from pgleader.queries import Queries, load_queries
from pgleader.sqlfiles import sql_dir

__all__ = ["QUERIES"]

QUERIES: Queries = load_queries(sql_dir() / "gateway" / "queries.sql")
