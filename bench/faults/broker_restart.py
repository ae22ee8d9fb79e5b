"""(b) A RabbitMQ restart (``rabbitmqctl stop_app`` / ``start_app``) during webhook load and
during routing.

WARNING: this stops the broker of the whole machine for ``--outage`` seconds (default 5);
anyone else's tests against it fail meanwhile. ``run-all`` runs it last, once.

The daemon (router and webhooks) routes 2,000 inbound messages already queued while signed
Twilio SMS webhooks arrive at ``--rate`` per second. After 5 s the broker stops; it starts
again ``--outage`` seconds later. A webhook answered 200 is offered (the spool fsynced it
or the broker confirmed it); one refused is retried with the same MessageSid, as Twilio
does. Every offered message must be routed once the broker is back.

    .venv/bin/python bench/faults/broker_restart.py [--rate 40] [--outage 5]
"""

import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from twilio.request_validator import RequestValidator

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults.common import rabbitmqctl  # noqa: E402
from bench.faults.harness import Result, options, run, set_up  # noqa: E402

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"  # noqa: S105 -- a throwaway test token
ACCOUNT_SID = "AC" + "0" * 32
PUBLIC_URL = "https://omniroute.example.test"
SMS = "/webhooks/twilio/sms"
FROM = ["+905321112233", "0532 111 22 33", "+14155550199", "+902165550234"]


class Webhooks:
    """Twilio, as far as a webhook goes: signed SMS at a fixed rate, retried when refused."""

    def __init__(self, port: int, rate: float) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.rate = rate
        self.validator = RequestValidator(AUTH_TOKEN)
        self.accepted: set[str] = set()
        self.answers: Counter[str] = Counter()
        self.retries = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=20) as client:
            n = 0
            started = time.monotonic()
            while not stop.is_set():
                sid = f"SM{n:032d}"
                task = asyncio.create_task(self._deliver(client, sid, n))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                n += 1
                await asyncio.sleep(max(0.0, started + n / self.rate - time.monotonic()))
            async with asyncio.timeout(60):
                await asyncio.gather(*self._tasks)

    async def _deliver(self, client: httpx.AsyncClient, sid: str, n: int) -> None:
        form = {
            "MessageSid": sid,
            "AccountSid": ACCOUNT_SID,
            "From": FROM[n % len(FROM)],
            "To": "+902125550000",
            "Body": f"message {n}",
        }
        headers = {"X-Twilio-Signature": self.validator.compute_signature(PUBLIC_URL + SMS, form)}
        for attempt in range(6):
            try:
                r = await client.post(SMS, data=form, headers=headers)
                self.answers[str(r.status_code)] += 1
                if r.status_code == 200:
                    self.accepted.add(sid)
                    return
            except httpx.HTTPError as exc:
                self.answers[type(exc).__name__] += 1
            self.retries += 1
            await asyncio.sleep(1.0 * (attempt + 1))


async def scenario(n: int, rate: float, outage: float, workdir: Path) -> Result:
    async with set_up(
        "broker_restart",
        workdir,
        messages=n,
        toml=f'[twilio]\naccount_sid = "{ACCOUNT_SID}"\nauth_token = "{AUTH_TOKEN}"\n'
        "[spool]\npublish_timeout = 2.0\nretry_initial = 0.5\nretry_max = 2.0\n"
        "[bus]\npublish_timeout = 5\nconnect_timeout = 3",
        key=lambda m: m.external_id,  # a webhook's MessageSid
    ) as stage:
        await stage.bus.close()  # the messages are queued; the broker goes away below
        webhooks = Webhooks(stage.daemon.http_port, rate)
        stop_load = asyncio.Event()
        broker_down = False
        try:
            stage.daemon.start("router", "webhooks")
            await stage.daemon.wait_http()
            load = asyncio.create_task(webhooks.run(stop_load))
            await stage.wait_routed(n // 4, "routing to start")
            await asyncio.sleep(1.0)
            fault_start = time.monotonic()
            broker_down = True
            await asyncio.to_thread(rabbitmqctl, "stop_app")
            await asyncio.sleep(outage)
            await asyncio.to_thread(rabbitmqctl, "start_app")
            broker_down = False
            fault_end = time.monotonic()
            await asyncio.sleep(10.0)  # webhook load goes on after the restart
            stop_load.set()
            await load
            stage.offered |= webhooks.accepted
            await stage.wait_all_routed()
            await stage.settle_and_stop()
        finally:
            if broker_down:
                rabbitmqctl("start_app")
            stop_load.set()
    return stage.counters(
        fault_start,
        fault_end,
        outage_s=outage,
        queued_inbound=n,
        webhooks_accepted=len(webhooks.accepted),
        webhook_answers=dict(webhooks.answers),
        webhook_retries=webhooks.retries,
    )


def main() -> int:
    args = options(__doc__, messages=2000, rate=40.0, outage=5.0)
    return run(lambda workdir: scenario(args.messages, args.rate, args.outage, workdir), 170)


if __name__ == "__main__":
    sys.exit(main())
