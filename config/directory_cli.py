"""``omniroute directory migrate|import|export|show|search|delete``."""

import argparse
import sys

from config.settings import Settings
from routers.store.engine import create_engine, current_revision, migrate, require_current


async def run(args: argparse.Namespace, settings: Settings) -> int:
    url = settings.directory_url
    if args.action == "migrate":
        await migrate(url)
        print(f"directory at schema revision {await current_revision(url)}")
        return 0
    await require_current(url)
    engine = create_engine(url, settings.directory)
    try:
        if args.action == "show":
            from config.directory_show import show

            return await show(engine, args, settings)
        if args.action == "search":
            from config.directory_search import search

            return await search(engine, args, settings)
        if args.action == "delete":
            from config.directory_delete import delete_record

            return await delete_record(engine, args, settings)
        if args.action == "import":
            from config.import_progress import printer
            from routers.csv.importer import import_csv

            shown = args.progress or sys.stderr.isatty()
            report = await import_csv(
                engine,
                args.file,
                kind=args.kind,
                region=settings.routing.default_region,
                dry_run=args.dry_run,
                delimiter="\t" if args.delimiter == "tab" else args.delimiter,
                encoding=args.encoding,
                progress=printer(args.file.name) if shown else None,
            )
            for reject in report.rejects:
                print(f"{args.file}:{reject.line}: rejected: {reject.reason}", file=sys.stderr)
            verb = "would import" if args.dry_run else "imported"
            # holidays.csv replaces each listed team's calendar: say what it took out
            removed = f", {report.removed} removed" if report.kind == "holidays" else ""
            print(
                f"{verb} {report.kind}: {report.inserted} new, {report.updated} updated"
                f"{removed}, {len(report.rejects)} rejected"
            )
            return 1 if report.rejects else 0
        from routers.csv.exporter import export_csv

        if args.output is not None:
            with args.output.open("w", encoding="utf-8", newline="") as out:
                count = await export_csv(engine, args.kind, out)
            print(f"exported {count} {args.kind} to {args.output}", file=sys.stderr)
        else:
            count = await export_csv(engine, args.kind, sys.stdout)
        return 0
    finally:
        await engine.dispose()
