"""(e) Dovecot stopped and started while a mailbox drains.

A mailbox of ``--mails`` mails (delivered straight into the maildir before the daemon
starts) is drained by the daemon's IMAP intake and router, one process. Once about a
fifth are taken (flagged ``$Omniroute``, which happens only after the broker's confirm),
Dovecot is stopped (SIGTERM: the daemon's IMAP connection drops mid-drain) and started
again ``--outage`` seconds later on the same port and maildir. A mail is flagged, and the
mailbox cursor moves, only after its publish is confirmed, so every mail must be routed;
the batch in flight at the stop may be published twice.

    .venv/bin/python bench/faults/dovecot_restart.py [--mails 5000] [--outage 5]
"""

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults.common import wait_until  # noqa: E402
from bench.faults.harness import Result, options, run, set_up  # noqa: E402
from tests.email_fixtures import Dovecot, fill_maildir, free_port, mailbox_toml  # noqa: E402


def taken(server: Dovecot) -> int:
    """Mails the daemon has flagged as taken (flagged only after the broker's confirm)."""
    client = server.imap()
    try:
        client.select("INBOX", readonly=True)
        _, data = client.uid("SEARCH", "KEYWORD", "$Omniroute")
        return len(data[0].split()) if data and data[0] else 0
    finally:
        client.logout()


async def scenario(mails: int, outage: float, workdir: Path) -> Result:
    root = Path(tempfile.mkdtemp(prefix="omniroute-fault-dovecot-"))
    os.chmod(root, 0o755)  # noqa: S103 -- dovecot's unprivileged processes read below it
    server = Dovecot(root=root, port=free_port())
    try:
        ids = await asyncio.to_thread(fill_maildir, server, mails, "fault")
        server.start()
        async with set_up(
            "dovecot_restart",
            workdir,
            messages=0,
            toml=mailbox_toml(server.port, timeout=10, backoff_initial=0.5, backoff_max=2),
            key=lambda m: m.external_id,
        ) as stage:
            stage.offered.update(ids)
            stage.daemon.start("email", "router")

            async def a_fifth_taken() -> bool:
                return await asyncio.to_thread(taken, server) >= mails // 5

            await wait_until(a_fifth_taken, 60, "a fifth of the mails taken")
            fault_start = time.monotonic()
            routed_at_stop = stage.routed
            taken_at_stop = await asyncio.to_thread(taken, server)
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(outage)
            routed_during_outage = stage.routed - routed_at_stop
            await asyncio.to_thread(server.start)
            fault_end = time.monotonic()
            await stage.wait_all_routed()
            done = time.monotonic()
            await stage.settle_and_stop()
            down = stage.daemon.events("email.mailbox_down")
        return stage.counters(
            fault_start,
            fault_end,
            outage_s=outage,
            routed_at_stop=routed_at_stop,
            taken_at_stop=taken_at_stop,
            routed_during_outage=routed_during_outage,
            drain_after_restart_s=round(done - fault_end, 2),
            mailbox_down_logged=len(down),
        )
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    args = options(__doc__, mails=5000, outage=5.0)
    return run(lambda workdir: scenario(args.mails, args.outage, workdir), 150)


if __name__ == "__main__":
    sys.exit(main())
