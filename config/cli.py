"""The ``omniroute`` command line. The only place an error becomes ``omniroute: message`` and
an exit code: 1 for a failure at run time, 2 for a usage or configuration error."""

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from config.dead.parser import add_parser as add_dead_parser
from config.registry import COMPONENTS, IDENTITY_KINDS
from ingest.errors import AuthError, ConfigError, OmnirouteError

if TYPE_CHECKING:  # imported in main(): `--help`, usage errors and `schema` need neither
    from config.settings import Settings

EXIT_FAILURE = 1
EXIT_USAGE = 2
#: what ``directory import`` and ``export`` take (routers.csv.format's kinds)
DIRECTORY_KINDS = ("teams", "agents", "customers", "holidays")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omniroute",
        description="Omnichannel ingestion and routing daemon.",
    )
    _add_common(parser, default=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument(
        "--component",
        action="append",
        choices=COMPONENTS,
        help="run only this component (repeatable); default: every configured one",
    )

    sub.add_parser("check", help="check the configuration, broker, database and connectors")
    schema = sub.add_parser("schema", help="print the JSON Schema of every message type")
    schema.add_argument(
        "--asyncapi",
        action="store_true",
        help="print the whole broker contract as an AsyncAPI 3.0 document instead",
    )

    directory = sub.add_parser("directory", help="manage the customer directory")
    dsub = directory.add_subparsers(dest="action", required=True, metavar="ACTION")
    dsub.add_parser("migrate", help="apply database migrations")
    imp = dsub.add_parser("import", help="import teams, agents, customers or holidays from CSV")
    imp.add_argument("file", type=Path)
    imp.add_argument("--kind", choices=DIRECTORY_KINDS, help="default: read from the header")
    imp.add_argument("--dry-run", action="store_true", help="validate only, change nothing")
    imp.add_argument(
        "--delimiter",
        choices=(",", ";", "tab"),
        help="the column separator; default: the one that makes the header's names known",
    )
    imp.add_argument(
        "--encoding", default="utf-8", help="the file's encoding, e.g. cp1254 (default utf-8)"
    )
    imp.add_argument(
        "--progress",
        action="store_true",
        help="say on stderr how far it got every 5 s (default: only when stderr is a terminal)",
    )
    exp = dsub.add_parser("export", help="export teams, agents, customers or holidays as CSV")
    exp.add_argument("--kind", choices=DIRECTORY_KINDS, required=True)
    exp.add_argument("--output", type=Path, help="file to write (default: stdout)")
    show = dsub.add_parser("show", help="a team's or agent's record, calendar, presence, load")
    show.add_argument("what", choices=("team", "agent"))
    show.add_argument("id")
    show.add_argument("--at", metavar="TIME", help="as of this RFC 3339 time; default: now")
    search = dsub.add_parser("search", help="customers, agents and teams by id, name or identity")
    search.add_argument("text")
    search.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    delete = dsub.add_parser("delete", help="delete a record nothing refers to any more")
    delete.add_argument("what", choices=("customer", "agent", "team"))
    delete.add_argument("id")
    delete.add_argument("--dry-run", action="store_true", help="say what would go, change nothing")

    customer = sub.add_parser("customer", help="one customer as the router sees them")
    csub = customer.add_subparsers(dest="action", required=True, metavar="ACTION")
    cshow = csub.add_parser("show", help="identities, team, last agent, recent contacts")
    cshow.add_argument("id", nargs="?", help="the customer")
    cshow.add_argument("--identity", metavar="ADDR", help="the customer owning this address")
    cshow.add_argument(
        "--show-identities", action="store_true", help="show addresses unredacted (logged)"
    )
    unstick = csub.add_parser("unstick", help="publish customer.unstick: forget the last agent")
    unstick.add_argument("id", help="the customer")
    unstick.add_argument("--reason", help="why, for the event and the log")

    agent = sub.add_parser("agent", help="agents' presence")
    asub = agent.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = asub.add_parser("status", help="publish an agent.status event")
    status.add_argument("id", help="the agent")
    status.add_argument("status", choices=("available", "away", "offline"))
    status.add_argument(
        "--until",
        metavar="TIME",
        help="away or offline until this RFC 3339 time, e.g. 2026-12-31T18:00+03:00",
    )
    status.add_argument(
        "--deputy", metavar="ID", help="the agent who takes their customers meanwhile"
    )

    route = sub.add_parser("route", help="routing tools")
    rsub = route.add_subparsers(dest="action", required=True, metavar="ACTION")
    explain = rsub.add_parser("explain", help="show the decision for a sender, step by step")
    explain.add_argument("--channel", choices=tuple(IDENTITY_KINDS), required=True)
    explain.add_argument("--from", dest="sender", required=True, help="sender address")
    explain.add_argument("--to", dest="recipient", help="address it arrived on")
    explain.add_argument("--in-reply-to", help="email Message-ID this message answers")
    explain.add_argument(
        "--auth",
        metavar="RESULTS",
        help="email: the sender's authentication as a trusted server reported it, e.g. "
        "dmarc=fail,spf=pass,dkim=none, or none (no trusted Authentication-Results); "
        "default: dmarc=pass",
    )
    explain.add_argument(
        "--verstat", help="voice: the caller ID's STIR/SHAKEN verdict, e.g. TN-Validation-Failed-A"
    )
    explain.add_argument(
        "--at",
        metavar="TIME",
        help="decide as of this RFC 3339 time (hours, holidays, who is away until when), "
        "e.g. 2026-12-31T23:30+03:00; default: now",
    )
    explain.add_argument("--subject", help="the message's subject (topic rules' keywords)")
    explain.add_argument("--text", default="", help="the message's text (topic rules' keywords)")
    explain.add_argument("--language", help="meta.language of the message (topic rules)")
    explain.add_argument("--json", action="store_true", help="machine-readable output")

    tail = sub.add_parser("tail", help="print routed messages live")
    tail.add_argument("--key", default="#", help="routing key pattern (default: everything)")
    tail.add_argument("--count", type=int, help="stop after this many messages")
    tail.add_argument(
        "--json", action="store_true", help="one routed message per line, as JSON (for rules test)"
    )
    tail.add_argument(
        "--show-identities",
        action="store_true",
        help="show senders' addresses and numbers unredacted (logged)",
    )

    rules = sub.add_parser("rules", help="topic rules: try a rule set before it goes live")
    rusub = rules.add_subparsers(dest="action", required=True, metavar="ACTION")
    rtest = rusub.add_parser("test", help="replay messages through a rule set, check expectations")
    rtest.add_argument("file", type=Path, help="TOML file of [[rules]] (and [[samples]])")
    rtest.add_argument(
        "--messages",
        type=Path,
        required=True,
        help="JSON lines: InboundMessages or routed messages (omniroute tail --json)",
    )
    rdiff = rusub.add_parser("diff", help="what the shadow candidate would have routed elsewhere")
    rdiff.add_argument("--since", default="24h", help="how far back: 24h, 7d, 90m (default 24h)")
    add_dead_parser(sub)
    _everywhere(parser)
    return parser


def _add_common(parser: argparse.ArgumentParser, default: object) -> None:
    """The options every command takes, before or after its name (issue 17: ``omniroute
    check --config f`` was a usage error); a subcommand's copy defaults to SUPPRESS, so it
    never hides the value given before the command."""
    parser.add_argument(
        "--config", default=default, help="TOML configuration file (default: $OMNIROUTE_CONFIG)"
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="also print the libraries' own log lines (broker and database clients); "
        "`omniroute run` always does",
    )


def _everywhere(parser: argparse.ArgumentParser) -> None:
    seen: set[int] = set()
    for action in parser._actions:  # noqa: SLF001 -- argparse has no public walk of subparsers
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001 -- same
            for child in action.choices.values():
                if id(child) not in seen:
                    seen.add(id(child))
                    _add_common(child, default=argparse.SUPPRESS)
                    _everywhere(child)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "schema":
            from ingest.asyncapi import document
            from ingest.schema import json_schemas

            print(json.dumps(document() if args.asyncapi else json_schemas(), indent=2))
            return 0
        from config.logging import configure as configure_logging
        from config.settings import config_path, load_settings

        path = config_path(args.config)
        settings = load_settings(path)
        if args.command == "run" and args.component:
            settings = settings.model_copy(update={"components": args.component})
        configure_logging(
            fmt=settings.log.format,
            level=settings.log.level,
            redact_identities=settings.log.redact,
            # a command's output is its own; the daemon's log keeps the libraries' lines
            libraries=args.command == "run" or args.verbose,
            stream=sys.stdout if args.command == "run" else sys.stderr,
        )
        return _unwrapped(asyncio.run, _dispatch(args, settings, path))
    except ConfigError as exc:
        print(f"omniroute: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (AuthError, OmnirouteError) as exc:
        print(f"omniroute: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:  # `omniroute schema | head`: the reader left, not an error
        sys.stderr.close()
        return 0
    except OSError as exc:  # a file the user named cannot be read or written
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"omniroute: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _unwrapped(
    run: Callable[[Coroutine[Any, Any, int]], int], main: Coroutine[Any, Any, int]
) -> int:
    """Run the daemon; a component's error leaves the TaskGroup wrapped in an exception
    group, and the user is owed the error itself, in one line."""
    try:
        return run(main)
    except BaseExceptionGroup as group:
        leaf = _first_omniroute_error(group)
        if leaf is None:
            raise
        raise leaf from None


def _first_omniroute_error(group: BaseExceptionGroup[BaseException]) -> OmnirouteError | None:
    for exc in group.exceptions:
        if isinstance(exc, OmnirouteError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_omniroute_error(exc)
            if found is not None:
                return found
    return None


async def _dispatch(args: argparse.Namespace, settings: "Settings", path: Path | None) -> int:
    if args.command == "run":
        from config.daemon import Daemon

        return await Daemon(settings, path).run()
    if args.command == "check":
        from config.check import run_checks

        return await run_checks(settings)
    if args.command == "directory":
        from config.directory_cli import run as run_directory

        return await run_directory(args, settings)
    if args.command == "customer":
        from config.customer_cli import run as run_customer

        return await run_customer(args, settings)
    if args.command == "agent":
        from config.agent_cli import run as run_agent

        return await run_agent(args, settings)
    if args.command == "route":
        from config.explain import explain

        return await explain(args, settings)
    if args.command == "tail":
        from config.tail import tail

        return await tail(
            settings,
            args.key,
            args.count,
            as_json=args.json,
            show_identities=args.show_identities,
        )
    if args.command == "rules":
        from config.rules_cli import run as run_rules

        return await run_rules(args, settings)
    if args.command == "dead":
        from config.dead.cli import run as run_dead

        return await run_dead(args, settings)
    raise ConfigError(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
