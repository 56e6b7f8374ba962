"""The gateway's schema stream (sql/gateway): signals, orders, positions, alerts.

Plugged into `pgleader migrate` by the entry point group ``pgleader.migrations``
(pyproject.toml), the way `serve` plugs into the CLI: pgleader never imports the
gateway, and applies this stream after its own.
"""

from __future__ import annotations

from pgleader.migrations import Stream
from pgleader.sqlfiles import sql_dir

__all__ = ["stream"]

stream = Stream("gateway", sql_dir() / "gateway")
