"""`moesaic merger run`: the merger role as a long-running process (see commands/roles.py)."""

from __future__ import annotations

from moesaic.commands.roles import add_run


def register(sub) -> None:
    p = sub.add_parser("merger", help="merger tools")
    g = p.add_subparsers(dest="merger_command", metavar="ACTION", required=True)
    add_run(g, "merger")
