"""(f) Three instances on one PostgreSQL directory, one of them SIGKILLed under load (issue 18).

Three ``omniroute run`` processes share one vhost, one PostgreSQL directory and one Dovecot
mailbox, as three hosts would. 6,000 inbound messages wait on ``omniroute.router``, 2,000
offers are already due in the directory (an agent's message not accepted in time: each
instance's timer worker may take them, ``FOR UPDATE SKIP LOCKED``) and 3,000 mails wait in
the mailbox, which only the instance holding its lease (``imap:support``, a PostgreSQL
advisory lock) polls. Once about a fifth of the messages and of the mails are routed, the
instance holding the mailbox's lease is killed with SIGKILL and started again. Every
inbound message and mail must be routed and every offer routed again (``<id>#2``): none
lost; what the killed instance had in flight may come twice (at-least-once), which the
counters show, with how many offers each instance fired, which instances took mail before
and after the kill (one at a time), and the takeover: from the kill to another instance's
``email.lease_acquired`` (the issue's goal: 10 s).

    .venv/bin/python bench/faults/instances.py [--messages 6000] [--offers 2000] [--mails 3000]
"""

import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults.common import Daemon, pg_directory, wait_until  # noqa: E402
from bench.faults.harness import Result, options, run, set_up  # noqa: E402
from tests.support.mail import Dovecot, fill_maildir, mailbox_toml  # noqa: E402
from tests.support.net import free_port  # noqa: E402
from tests.support.timers import write_due_offers  # noqa: E402

#: an example customer and the agent their offers went to (config/examples)
OFFERED_TO = ("kemal.ozturk@example.com.tr", "c-1001", "mehmet")


async def due_offers(url: str, n: int) -> list[str]:
    """``n`` offers due a minute ago, written as the router's claim writes them; their
    channel ids (the key every routed message is counted by here)."""
    offered = await write_due_offers(url, n, [OFFERED_TO], "instances.test")
    return [m.external_id for m in offered]


def _holder(daemons: list[Daemon], since: float = 0.0) -> Daemon | None:
    """The instance that last acquired the mailbox's lease after ``since`` (wall clock)."""
    found: list[tuple[str, Daemon]] = []
    for daemon in daemons:
        for event in daemon.events("email.lease_acquired"):
            stamp = str(event.get("timestamp", ""))
            if stamp and _epoch(stamp) >= since:
                found.append((stamp, daemon))
    return max(found, key=lambda f: f[0])[1] if found else None


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def scenario(n: int, offers: int, mails: int, workdir: Path) -> Result:
    root = Path(tempfile.mkdtemp(prefix="omniroute-fault-instances-"))
    os.chmod(root, 0o755)  # noqa: S103 -- dovecot's unprivileged processes read below it
    server = Dovecot(root=root, port=free_port())
    try:
        mail_ids = await asyncio.to_thread(fill_maildir, server, mails, "instances")
        server.start()
        return await _run(n, offers, mail_ids, server, workdir)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def _run(n: int, offers: int, mail_ids: list[str], server: Dovecot, workdir: Path) -> Result:
    toml = mailbox_toml(server.port, timeout=10, backoff_initial=0.5, backoff_max=2)
    async with (
        pg_directory() as database_url,
        set_up(
            "instances",
            workdir / "a",
            messages=n,
            database_url=database_url,
            toml=toml,
            key=lambda m: m.external_id,
        ) as stage,
    ):
        a = stage.daemon
        b = Daemon(workdir / "b", a.amqp_url, database_url, toml=toml)
        c = Daemon(workdir / "c", a.amqp_url, database_url, toml=toml)
        daemons = [a, b, c]
        stage.offered |= set(await due_offers(database_url, offers))
        stage.offered |= set(mail_ids)
        for daemon in daemons:
            daemon.start()
        try:
            await stage.wait_routed((n + offers + len(mail_ids)) // 5, "the first routed")
            await wait_until(
                lambda: (
                    sum(stage.collector.counts.get(m, 0) > 0 for m in mail_ids)
                    >= len(mail_ids) // 5
                ),
                60,
                "a fifth of the mails routed",
            )
            victim = _holder(daemons)
            assert victim is not None, "no instance holds the mailbox's lease"
            fault_start = time.monotonic()
            victim.kill(signal.SIGKILL)  # returns once the process is gone
            killed_at = time.time()  # the victim's log is complete before it
            routed_at_kill = stage.routed
            survivors = [d for d in daemons if d is not victim]
            await wait_until(lambda: _holder(survivors, killed_at) is not None, 30, "a takeover")
            takeover = time.monotonic() - fault_start
            victim.start()
            fault_end = time.monotonic()
            await stage.wait_all_routed()
            done = time.monotonic()
            new_holder = _holder(daemons, killed_at)
            await stage.settle_and_stop()  # stops a; late duplicates arrive meanwhile
        finally:
            for daemon in (b, c):
                if daemon.proc is not None and daemon.proc.poll() is None:
                    daemon.kill(signal.SIGTERM)
        names = {id(d): name for d, name in zip(daemons, "abc", strict=True)}
        fired = [len(d.events("offers.rerouted")) for d in daemons]
        # by the log lines' own time: the holder kept taking mail until the kill landed
        took = [[_epoch(str(e["timestamp"])) for e in d.events("email.taken")] for d in daemons]
        took_mail_before = [sum(t < killed_at for t in times) for times in took]
        took_mail_after = [sum(t >= killed_at for t in times) for times in took]
        pollers_before = [names[id(d)] for d, k in zip(daemons, took_mail_before, strict=True) if k]
        pollers_after = [names[id(d)] for d, k in zip(daemons, took_mail_after, strict=True) if k]
        tracebacks = b.tracebacks() + c.tracebacks()
        result = stage.counters(
            fault_start,
            fault_end,
            routed_at_kill=routed_at_kill,
            killed=names[id(victim)],
            takeover_s=round(takeover, 2),
            took_over=None if new_holder is None else names[id(new_holder)],
            mails=len(mail_ids),
            mails_duplicated=sum(
                stage.collector.counts.get(m, 0) - 1
                for m in mail_ids
                if m in stage.collector.counts
            ),
            mail_pollers_before_kill=pollers_before,
            mail_pollers_after_kill=pollers_after,
            offers_due=offers,
            offers_fired_by_instance=fired,
            drain_after_restart_s=round(done - fault_end, 2),
        )
        result["tracebacks"] += tracebacks
        survivors_fired = all(fired[i] > 0 for i, d in enumerate(daemons) if d is not victim)
        result["ok"] = (
            survivors_fired
            and pollers_before == [names[id(victim)]]
            and len(pollers_after) == 1
            and takeover <= 10
        )
        return result


def main() -> int:
    args = options(__doc__, messages=6000, offers=2000, mails=3000)
    return run(lambda workdir: scenario(args.messages, args.offers, args.mails, workdir), 300)


if __name__ == "__main__":
    sys.exit(main())
