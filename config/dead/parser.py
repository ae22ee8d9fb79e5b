"""The arguments of ``omniroute dead`` (argparse only: ``config.cli`` builds its parser
without importing a broker client)."""

import argparse


def add_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """The ``dead`` command and its actions (argparse only: no broker client imported)."""
    dead = sub.add_parser("dead", help="look at, replay and purge omniroute.dead")
    dsub = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = dsub.add_parser("list", help="the dead letters, oldest first; takes none off")
    listing.add_argument("--reason", help="only reasons starting with this (unknown_agent)")
    listing.add_argument("--since", metavar="T", help="dead since: 24h, 7d or an RFC 3339 time")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = dsub.add_parser("show", help="one dead letter: headers, reason, body")
    show.add_argument("id", help="its message id, or the sha256:… id list shows")
    show.add_argument(
        "--show-identities",
        action="store_true",
        help="show customers' addresses and numbers unredacted (logged)",
    )
    replay = dsub.add_parser("replay", help="publish dead letters again where they came from")
    replay.add_argument("ids", nargs="*", metavar="ID", help="message ids (or sha256:… ids)")
    replay.add_argument("--reason", help="every dead letter whose reason starts with this")
    replay.add_argument("--all", action="store_true", help="every dead letter")
    replay.add_argument("--dry-run", action="store_true", help="say what would be replayed")
    purge = dsub.add_parser("purge", help="remove dead letters older than a duration")
    purge.add_argument("--older-than", required=True, metavar="D", help="30m, 24h, 7d")
    purge.add_argument("--reason", help="only reasons starting with this")
    purge.add_argument("--dry-run", action="store_true", help="list what would be removed")
