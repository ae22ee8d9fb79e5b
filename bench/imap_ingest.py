"""IMAP ingestion rate: a local Dovecot mailbox of N mails through ``EmailConnector`` into
the real broker, against a bare aioimaplib fetch loop over the same mailbox in the same run,
and against the honest limit for the work (issue 18): a bare single-process loop that
fetches, parses each mail with the stdlib (``policy.default``: sender, subject, Message-ID,
the text body) and publishes a small JSON of it with publisher confirms, per batch.

Sole purpose: say what omniroute's intake costs on top of merely reading the mail. The bare
loop does what the connector's transport must do anyway (SELECT, ``UID SEARCH``, ``UID
FETCH (UID BODY.PEEK[])`` in batches of the same size) and nothing else: no parsing, no
deduplication, no publishing, no flags. The connector run is the daemon's intake path:
MIME normalisation, the seen-id and slot records and the cursor on a SQLite directory,
a confirmed persistent publish per mail on a fresh RabbitMQ vhost (quorum queues, as
deployed), then ``\\Seen $Omniroute`` per batch; its logging is the daemon's JSON,
written to /dev/null.

Needs Dovecot (``/usr/sbin/dovecot``) and RabbitMQ on 127.0.0.1 with ``rabbitmqctl``; run
as root (the mail directory is handed to ``nobody``), from the repository root:

    .venv/bin/python bench/imap_ingest.py [--messages 5000] [--batch 50]

The mails are written straight into the maildir before Dovecot first sees them, and one
untimed bare pass warms Dovecot's index and the page cache, so both timed passes read the
same warm mailbox. Benchmarks are never tests: this prints, it does not assert a rate.
"""

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from email import policy
from email.parser import BytesParser
from pathlib import Path

import aio_pika
import aioimaplib
from pydantic import SecretStr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the Dovecot the tests use, so both measure the same server

from config.logging import configure  # noqa: E402
from connectors.email.intake import EmailConnector  # noqa: E402
from connectors.settings import EmailSettings, MailboxSettings  # noqa: E402
from ingest.bus import Bus  # noqa: E402
from ingest.health import Health  # noqa: E402
from ingest.settings import BusSettings  # noqa: E402
from ingest.sink import BusSink  # noqa: E402
from routers.store.connector_state import DbCursorStore, DbSeenStore  # noqa: E402
from routers.store.engine import create_engine, migrate  # noqa: E402
from tests.email_fixtures import PASSWORD, USER, Dovecot, free_port, make_mail  # noqa: E402

AMQP_HOST = os.environ.get("OMNIROUTE_TEST_AMQP_HOST", "127.0.0.1:5672")
SENDERS = ("ayse@acme.test", "it@globex.test", "stranger@nowhere.test")


def fill_maildir(server: Dovecot, n: int) -> int:
    """Write n mails (about 1.6 KiB each, Turkish text) into the user's maildir ``new/``."""
    home = server.root / "mail" / USER
    for sub in ("cur", "new", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    size = 0
    stamp = int(time.time())
    for i in range(n):
        raw = make_mail(
            f"bench-{i:06d}@customer.example",
            sender=SENDERS[i % len(SENDERS)],
            subject=f"Sipariş {i} hakkında",
            text="Merhaba, siparişim henüz gelmedi. " * 30,
        )
        (home / "new" / f"{stamp}.M{i}P{os.getpid()}.bench").write_bytes(raw)
        size += len(raw)
    for path in (server.root / "mail", home, *home.iterdir(), *(home / "new").iterdir()):
        shutil.chown(path, "nobody", "nogroup")
    return size


async def bare_fetch(port: int, batch: int) -> tuple[int, int, float]:
    """(mails, body bytes, seconds) of SELECT, UID SEARCH and batched UID FETCH BODY.PEEK[]."""
    client = aioimaplib.IMAP4(host="127.0.0.1", port=port, timeout=60)
    await client.wait_hello_from_server()
    await client.login(USER, PASSWORD)
    started = time.perf_counter()
    await client.select("INBOX")
    response = await client.uid_search("ALL", charset=None)
    uids = [w for line in response.lines[:-1] for w in bytes(line).split() if w.isdigit()]
    mails = size = 0
    for start in range(0, len(uids), batch):
        uid_set = b",".join(uids[start : start + batch]).decode()
        fetched = await client.uid("fetch", uid_set, "(UID BODY.PEEK[])")
        assert fetched.result == "OK", fetched
        for line in fetched.lines:
            if isinstance(line, bytearray):
                mails += 1
                size += len(line)
    seconds = time.perf_counter() - started
    await client.logout()
    return mails, size, seconds


async def honest_loop(port: int, batch: int) -> tuple[int, float, float]:
    """(mails, seconds, machine CPU seconds) of fetch + stdlib parse + confirmed persistent
    publish, per batch:
    what any intake must do for a mail, without omniroute's bounds, records and flags."""
    vhost = f"omniroute-bench-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    connection = await aio_pika.connect(f"amqp://guest:guest@{AMQP_HOST}/{vhost}")
    client = aioimaplib.IMAP4(host="127.0.0.1", port=port, timeout=60)
    try:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            "intake", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await client.wait_hello_from_server()
        await client.login(USER, PASSWORD)
        started, busy = time.perf_counter(), machine_busy()
        await client.select("INBOX")
        response = await client.uid_search("ALL", charset=None)
        uids = [w for line in response.lines[:-1] for w in bytes(line).split() if w.isdigit()]
        mails = 0
        parser = BytesParser(policy=policy.default)
        for start in range(0, len(uids), batch):
            uid_set = b",".join(uids[start : start + batch]).decode()
            fetched = await client.uid("fetch", uid_set, "(UID BODY.PEEK[])")
            assert fetched.result == "OK", fetched
            publishes = []
            for line in fetched.lines:
                if not isinstance(line, bytearray):
                    continue
                mail = parser.parsebytes(bytes(line))
                body = mail.get_body(preferencelist=("plain", "html"))  # type: ignore[attr-defined]
                text = body.get_content() if body is not None else ""
                payload = {
                    "from": str(mail["from"]),
                    "subject": str(mail["subject"]),
                    "message_id": str(mail["message-id"]),
                    "text": text,
                }
                publishes.append(
                    channel.default_exchange.publish(
                        aio_pika.Message(
                            json.dumps(payload).encode(),
                            content_type="application/json",
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=queue.name,
                    )
                )
            await asyncio.gather(*publishes)  # every confirm of the batch
            mails += len(publishes)
        seconds, cpu = time.perf_counter() - started, machine_busy() - busy
        await client.logout()
        return mails, seconds, cpu
    finally:
        await connection.close()
        _rabbitmqctl("delete_vhost", vhost)


def _rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)  # noqa: S603


async def connector_drain(port: int, batch: int, workdir: Path) -> tuple[int, float, float]:
    """(mails submitted, seconds, machine CPU seconds) of one ``drain`` into a fresh
    vhost."""
    vhost = f"omniroute-bench-{uuid.uuid4().hex[:10]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    db_url = f"sqlite:///{workdir}/directory.db"
    await migrate(db_url)
    engine = create_engine(db_url)
    bus = Bus(f"amqp://guest:guest@{AMQP_HOST}/{vhost}", BusSettings(), name="bench")
    try:
        await bus.open()
        box = MailboxSettings(
            name="support",
            host="127.0.0.1",
            port=port,
            security="none",
            username=USER,
            password=SecretStr(PASSWORD),
            batch_size=batch,
            timeout=60,
        )
        connector = EmailConnector(
            EmailSettings(mailboxes=[box]),
            sink=BusSink(bus),
            cursors=DbCursorStore(engine),
            seen=DbSeenStore(engine),
            health=Health(),
        )
        started, busy = time.perf_counter(), machine_busy()
        taken = await connector.drain()
        return taken, time.perf_counter() - started, machine_busy() - busy
    finally:
        await bus.close()
        await engine.dispose()
        _rabbitmqctl("delete_vhost", vhost)


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (``/proc/stat``: all but idle and
    iowait): every process a path makes work counts, Dovecot and RabbitMQ included."""
    with open("/proc/stat") as stat:
        ticks = [int(t) for t in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


async def measure(
    port: int, batch: int, workdir: Path
) -> tuple[int, int, float, int, float, float, int, float, float]:
    """The three passes, and the machine's CPU seconds over the last two."""
    await bare_fetch(port, batch)  # warm-up: index built, files in the page cache
    bare_n, bare_bytes, bare_s = await bare_fetch(port, batch)
    honest_n, honest_s, honest_cpu = await honest_loop(port, batch)
    taken, conn_s, conn_cpu = await connector_drain(port, batch, workdir)
    return bare_n, bare_bytes, bare_s, honest_n, honest_s, honest_cpu, taken, conn_s, conn_cpu


def main(messages: int, batch: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="omniroute-bench-"))
    os.chmod(root, 0o755)  # noqa: S103 (dovecot's unprivileged processes read below it)
    server = Dovecot(root=root, port=free_port())
    try:
        size = fill_maildir(server, messages)
        server.start()
        with open(os.devnull, "w") as null:
            with contextlib.redirect_stdout(null):
                configure(fmt="json", level="info")  # the daemon's logging, to /dev/null
            bare_n, bare_bytes, bare_s, honest_n, honest_s, honest_cpu, taken, conn_s, conn_cpu = (
                asyncio.run(measure(server.port, batch, root))
            )
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    if bare_n != messages or taken != messages or honest_n != messages:
        raise SystemExit(
            f"expected {messages} mails: bare loop saw {bare_n}, parse+publish loop "
            f"{honest_n}, connector {taken}"
        )
    bare_rate, conn_rate, honest_rate = bare_n / bare_s, taken / conn_s, honest_n / honest_s
    print(f"mailbox: {messages} mails, {size / 2**20:.1f} MiB, batch {batch}")
    print(f"bare aioimaplib fetch: {bare_rate:9.0f} mails/s ({bare_s:.2f} s, {bare_bytes} bytes)")
    print(f"EmailConnector -> bus: {conn_rate:9.0f} mails/s ({conn_s:.2f} s)")
    print(f"fetch+parse+publish:   {honest_rate:9.0f} mails/s ({honest_s:.2f} s)")
    print(f"ratio bare/connector:  {bare_rate / conn_rate:9.1f}x")
    print(f"connector / fetch+parse+publish: {conn_rate / honest_rate:.2f}")
    # the machine's busy time over each timed pass, so the ratio can be read against what
    # each path costs in all (parse workers, Dovecot and RabbitMQ included)
    for name, cpu, n, secs in (
        ("fetch+parse+publish", honest_cpu, honest_n, honest_s),
        ("EmailConnector", conn_cpu, taken, conn_s),
    ):
        print(f"machine CPU, {name}: {cpu / secs:.2f} cores busy, {cpu / n * 1000:.2f} ms a mail")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    main(args.messages, args.batch)
