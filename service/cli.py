"""`pgleader serve`: the gateway's verb, plugged into the pgleader CLI by entry point."""

from __future__ import annotations

import argparse
from typing import Any

from pgleader.cli import add_common, add_timings, timings_from
from pgleader.config import resolve_dsn
from service.config import add_arguments, from_args

__all__ = ["register"]


def register(verbs: Any) -> None:
    text = "run one gateway instance (starts an embedded PostgreSQL when no DSN is given)"
    parser: argparse.ArgumentParser = verbs.add_parser("serve", help=text, description=text)
    add_common(parser)
    add_timings(parser)
    add_arguments(parser)
    parser.set_defaults(func=_serve)


async def _serve(args: argparse.Namespace) -> int:
    from service.process import serve

    config = from_args(args, resolve_dsn(args.dsn), timings_from(args))
    return await serve(config)
