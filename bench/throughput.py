#!/usr/bin/env python3
"""Router throughput on the real broker, as a ratio to the bare forwarder in the same run.

For each round: the bare forwarder (``bench/forwarder.py``) moves N messages of the router's
own body size through the broker and is timed; then N ``InboundMessage`` emails (``--known``
share from customers in the directory, the rest from strangers; every fifth known customer
has a last agent) are preloaded into ``omniroute.router`` (not timed), ``--workers`` router
processes are started and wait at a barrier, and the time from "go" to the N-th routed
message confirmed in ``omniroute.routed`` is measured. Each router process runs the real
``routers.worker.RouterWorker`` with the real ``Bus``, ``DirectoryDecider`` and engine, default
settings (quorum queues, prefetch 256), and the daemon's JSON logging to a file.

After the last round the forwarder is timed once more, so that every router round lies
between two forwarder runs, and its ratio is to their mean: this machine's speed drifts by
10-40 % within minutes, and a ratio to the run before alone carries that drift. With
``--workers N`` above 1 the forwarder runs as N processes on one queue
(``forwarder.forward_processes``): N routers are compared with N forwarders (issue 18).

A fresh vhost is created for the run and deleted at the end; every round routes into a
fresh copy of the directory, so the duplicate-removal record starts empty each time.

With ``--ack`` (issue 16) each router process acknowledges new conversations as the daemon
does with ``[ack]`` (its defaults): every known sender here is one, so about ``--known`` of
the messages each claim a row in the ``acks`` ledger and publish a reply request, which
piles up in ``omniroute.outbound`` (counted, then purged after each round).

Usage: throughput.py [--customers 100000] [-n 20000] [--workers 1] [--rounds 3]
       [--known 0.7] [--prefetch 256] [--database-url postgresql://...] [--calendars] [--ack]
"""

import argparse
import asyncio
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import benchlib
from forwarder import forward, forward_processes, limit_sample

HERE = Path(__file__).resolve().parent


def make_body(i: int, known_share: float, customers: int, run: str, size: int) -> bytes:
    """An email from a known customer (``known_share`` of them) or a stranger, ``size`` bytes."""
    from ingest.schema import Identity, InboundMessage, Thread

    # spread known senders over the directory; the same i always maps to the same sender
    known = (i * 7919 % 1000) < known_share * 1000
    address = (benchlib.known_email(i * 104729 % customers) if known
               else f"stranger{i}@nowhere{i % 13}.example")
    external = f"<bench-{run}-{i}@mail.example>"
    msg = InboundMessage(
        channel="email", external_id=external,
        sender=Identity(kind="email", address=address),
        recipient=Identity(kind="email", address="support@example.com"),
        subject="Modemim calismiyor", text="", thread=Thread(message_id=external),
    )
    pad = size - len(msg.model_dump_json())
    filler = PROSE if os.environ.get("OMNIROUTE_BENCH_PROSE") else "x"
    msg.text = (filler * (pad // len(filler) + 1))[: max(pad, 0)]
    return msg.model_dump_json().encode()


if TYPE_CHECKING:
    from routers.settings import RoutingSettings

PROSE = "Merhaba, faturamı ödedim ama internet bağlantım hâlâ yok; lütfen yardım edin. "


def topic_rules(n: int, modem_team: str) -> list[dict[str, object]]:
    """Issue 20's rule set for the bench: ``n`` rules whose keywords never match (every one
    is asked), each tenth before the owner (asked for known customers too), each seventh a
    tag rule, and a last one that takes the subject's "Modemim" to ``modem_team``."""
    rules: list[dict[str, object]] = []
    for i in range(max(n - 1, 0)):
        rule: dict[str, object] = {"name": f"r{i}", "keywords": [f"konu{i}x", f"urun{i}x",
                                                                 f"hizmet {i}x"]}
        if i % 7 == 6:
            rule["tag"] = f"t{i}"
        else:
            rule["team"] = f"team-{i % 20:02d}"
            rule["override_owner"] = i % 10 == 9
        rules.append(rule)
    if n:
        rules.append({"name": "modem", "keywords": ["modem"], "team": modem_team})
    return rules


def routing_settings() -> "RoutingSettings":
    """The routers' RoutingSettings: OMNIROUTE_BENCH_RULES rules, and with
    OMNIROUTE_BENCH_SHADOW a candidate set that sends the modem rule elsewhere."""
    from routers.settings import RoutingSettings

    n = int(os.environ.get("OMNIROUTE_BENCH_RULES", "0"))
    values: dict[str, object] = {"default_region": benchlib.REGION,
                                 "rules": topic_rules(n, "team-05")}
    if os.environ.get("OMNIROUTE_BENCH_SHADOW"):
        candidate = benchlib.CACHE / f"candidate-{os.getpid()}.toml"
        candidate.write_text("".join(_toml_rule(r) for r in topic_rules(n or 1, "team-06")),
                             encoding="utf-8")
        values["shadow_rules"] = str(candidate)
        try:
            return RoutingSettings.model_validate(values)  # the file is read here, once
        finally:
            candidate.unlink()
    return RoutingSettings.model_validate(values)


def _toml_rule(rule: dict[str, object]) -> str:
    return "[[rules]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in rule.items())


async def preload(url: str, bodies: list[bytes]) -> None:
    from ingest.bus import Bus
    from ingest.settings import BusSettings
    from ingest.topology import INBOUND

    bus = Bus(url, BusSettings(), name="bench-preload")
    await bus.open()
    try:
        for start in range(0, len(bodies), 512):
            await asyncio.gather(*(
                bus.publish_body(INBOUND, "email", body, message_id=str(uuid.uuid4()),
                                 type_="omniroute.inbound.v1")
                for body in bodies[start:start + 512]))
    finally:
        await bus.close()


async def depth(url: str, queue: str) -> int:
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        return q.declaration_result.message_count or 0
    finally:
        await conn.close()


async def time_router(url: str, db_url: str, n: int, workers: int, prefetch: int,
                      logdir: Path, profile: str | None, cache_ttl: float | None,
                      cpu: list[float] | None = None,
                      usage: list[dict[str, float]] | None = None, ack: bool = False) -> float:
    """Start ``workers`` router processes, release them together, time until N are routed.

    ``cpu`` gets the CPU seconds the router processes spent from "go" to "stop" (summed);
    ``usage`` their kernel seconds and context switches over the same span (summed).
    """
    import aio_pika

    procs: list[subprocess.Popen[bytes]] = []
    for w in range(workers):
        cmd = [sys.executable, str(HERE / "throughput.py"), "--child", "--url", url,
               "--database-url", db_url, "--prefetch", str(prefetch)]
        if cache_ttl is not None:
            cmd += ["--cache-ttl", str(cache_ttl)]
        if ack:
            cmd += ["--ack"]
        if profile and w == 0:
            cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "-o", profile,
                   "-f", "raw", "-r", "200", "--", *cmd]
        log = (logdir / f"router-{w}.log").open("wb")
        procs.append(subprocess.Popen(  # noqa: ASYNC220 (before the clock starts)
            cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.PIPE))
    try:
        for p in procs:
            assert p.stderr is not None
            line = await asyncio.to_thread(p.stderr.readline)
            if line.strip() != b"ready":
                raise SystemExit(f"router process failed: {line!r} {p.stderr.read()!r}")
        conn = await aio_pika.connect(url)
        ch = await conn.channel()
        t0 = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()
        deadline = t0 + 600
        while True:
            q = await ch.declare_queue("omniroute.routed", passive=True)
            if (q.declaration_result.message_count or 0) >= n:
                break
            if time.perf_counter() > deadline:
                raise SystemExit("router did not finish within 600 s")
            await asyncio.sleep(0.01)
        dt = time.perf_counter() - t0
        await conn.close()
    finally:
        for p in procs:
            if p.poll() is None and p.stdin is not None:
                p.stdin.write(b"stop\n")
                p.stdin.flush()
        spent = 0.0
        used = {"sys": 0.0, "voluntary": 0.0, "involuntary": 0.0}
        for p in procs:
            try:
                _, err = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                continue
            for line in err.decode(errors="replace").splitlines():
                if line.startswith("cpu "):
                    spent += float(line.split()[1])
                elif line.startswith("rusage "):
                    for part in line.split()[1:]:
                        key, value = part.split("=")
                        used[key] += float(value)
        if cpu is not None:
            cpu.append(spent)
        if usage is not None:
            usage.append(used)
    return n / dt


async def child(url: str, db_url: str, prefetch: int, cache_ttl: float | None,
                ack: bool = False) -> None:
    """One router process: the daemon's logging, bus, engine, decider and RouterWorker."""
    from config.logging import configure
    from ingest.bus import Bus
    from ingest.health import Health
    from ingest.metrics import Metrics
    from ingest.settings import BusSettings
    from routers.decider import DirectoryDecider
    from routers.settings import DirectorySettings, RouterSettings
    from routers.store.engine import create_engine
    from routers.worker import RouterWorker

    configure(fmt="json", level="info")
    health, metrics = Health(), Metrics()
    routing = routing_settings()  # issue 20: --rules N, --shadow
    bus = Bus(url, BusSettings(), name="bench-router", health=health, metrics=metrics)
    await bus.open()
    engine = create_engine(db_url, DirectorySettings())
    router = RouterSettings(prefetch=prefetch)
    if cache_ttl is not None:
        router = router.model_copy(update={"directory_cache_ttl": cache_ttl})
    # as config.components.Wiring builds them (an older tree, for before/after runs, has no
    # directory cache)
    ttl = getattr(router, "directory_cache_ttl", None)
    decider = (
        DirectoryDecider(engine, routing)
        if ttl is None
        else DirectoryDecider(engine, routing, cache_ttl=ttl)
    )
    if routing.shadow is not None:  # as config.components.Wiring sets it
        from routers.shadow import ShadowWatch
        from routers.store.transactions import transactions_of

        decider.shadow = ShadowWatch(transactions_of(engine), metrics)
    worker = RouterWorker(bus=bus, engine=engine, decider=decider,
                          routing=routing, settings=router,
                          health=health, metrics=metrics)
    if ack:  # as config.components.Wiring adds it with [ack]
        from routers import ack_text
        from routers.acks import Acknowledger
        from routers.settings import AckSettings

        worker.acks = Acknowledger(bus=bus, engine=engine, directory=decider.directory,
                                   settings=AckSettings(), routing=routing,
                                   templates=ack_text.load(None), metrics=metrics)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    gc.freeze()  # as the daemon does once started (config/daemon.py)
    sys.stderr.write("ready\n")
    sys.stderr.flush()
    if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "go":
        return
    c0, r0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    task = asyncio.create_task(worker.run(stop, drain_timeout=10))
    await loop.run_in_executor(None, sys.stdin.readline)  # "stop" or EOF
    stop.set()
    await task
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    sys.stderr.write(f"cpu {time.process_time() - c0:.3f}\n")
    sys.stderr.write(f"rusage sys={r1.ru_stime - r0.ru_stime:.3f} "
                     f"voluntary={r1.ru_nvcsw - r0.ru_nvcsw} "
                     f"involuntary={r1.ru_nivcsw - r0.ru_nivcsw}\n")
    sys.stderr.write(f"routed {worker.routed} duplicates {worker.duplicates}\n")
    if worker.acks is not None:
        sys.stderr.write(f"acks published {worker.acks.published}\n")
    await bus.close()
    await engine.dispose()


def fresh_db(template: Path | None, tag: str, database_url: str | None
             ) -> tuple[str, Path | None]:
    if database_url:
        return database_url, None
    assert template is not None
    copy = benchlib.CACHE / f"run-{tag}.sqlite"
    shutil.copyfile(template, copy)
    return f"sqlite:///{copy}", copy


async def forwarders(url: str, a: argparse.Namespace, bodies: list[bytes],
                     cpu: list[float]) -> float:
    """The ceiling for ``a.workers`` router processes: as many forwarder processes on one
    queue (one forwarder runs in this process, as ever)."""
    if a.workers > 1:
        return await forward_processes(url, a.n, a.prefetch, lambda i: bodies[i], a.workers,
                                       cpu=cpu)
    return await forward(url, a.n, a.prefetch, lambda i: bodies[i], quiet=True, cpu=cpu)


async def main(a: argparse.Namespace) -> None:
    print(benchlib.machine())
    # an imported --database-url directory needs no SQLite copy (ten million customers)
    template = None if a.database_url else benchlib.directory_db(a.customers)
    size = len(limit_sample(0))
    run = uuid.uuid4().hex[:6]
    bodies = [make_body(i, a.known, a.customers, run, size) for i in range(a.n)]
    print(f"messages: {a.n}, {len(bodies[0])} bytes each (limit_forwarder sample: {size}), "
          f"known senders {a.known:.0%}, customers {a.customers}, prefetch {a.prefetch}, "
          f"router processes {a.workers}")
    logdir = benchlib.CACHE / f"logs-{run}"
    logdir.mkdir(parents=True, exist_ok=True)
    fwd_rates: list[float] = []
    fwdq_rates: list[float] = []
    router_rates: list[float] = []
    fwd_cpu: list[float] = []
    router_cpu: list[float] = []
    router_usage: list[dict[str, float]] = []
    with benchlib.fresh_vhost() as url:
        for r in range(a.rounds):
            fwd_rates.append(await forwarders(url, a, bodies, fwd_cpu))
            if a.quorum_forwarder:
                fwdq_rates.append(await forward(url, a.n, a.prefetch, lambda i: bodies[i],
                                                queue_type="quorum", quiet=True))
            db_url, copy = fresh_db(template, f"{run}-{r}", a.database_url)
            if a.calendars and (copy is not None or r == 0):
                await benchlib.calendars_on(db_url)
            try:
                # new message and channel ids each round: a --database-url directory keeps
                # the routed records of the rounds before
                round_bodies = [make_body(i, a.known, a.customers, f"{run}{r}", size)
                                for i in range(a.n)]
                await preload(url, round_bodies)
                profile = f"{a.profile}.{r}.json" if a.profile else None
                router_rates.append(await time_router(url, db_url, a.n, a.workers, a.prefetch,
                                                      logdir, profile, a.cache_ttl,
                                                      router_cpu, router_usage, a.ack))
                dead = await depth(url, "omniroute.dead")
                left = await depth(url, "omniroute.router")
                routed = await depth(url, "omniroute.routed")
                if dead or left or routed != a.n:
                    raise SystemExit(f"round {r}: routed {routed}, dead {dead}, left {left}")
                await purge(url, "omniroute.routed")
                if a.ack:
                    print(f"round {r + 1}: acknowledgements published "
                          f"{await depth(url, 'omniroute.outbound')}")
                    await purge(url, "omniroute.outbound")
            finally:
                if copy is not None:
                    for p in (copy, Path(f"{copy}-wal"), Path(f"{copy}-shm")):
                        p.unlink(missing_ok=True)
            line = (f"round {r + 1}: forwarder {fwd_rates[-1]:.0f} msg/s, "
                    f"router x{a.workers} {router_rates[-1]:.0f} msg/s, "
                    f"ratio to the forwarder before {router_rates[-1] / fwd_rates[-1]:.2f}; "
                    "CPU per message: "
                    f"forwarder {fwd_cpu[-1] / a.n * 1000:.3f} ms, "
                    f"router {router_cpu[-1] / a.n * 1000:.3f} ms "
                    f"({router_usage[-1]['sys'] / a.n * 1000:.3f} in the kernel, "
                    f"{router_usage[-1]['voluntary'] / a.n:.2f} voluntary context switches)")
            if fwdq_rates:
                line += f" (forwarder on quorum queues {fwdq_rates[-1]:.0f} msg/s)"
            print(line, flush=True)
        fwd_rates.append(await forwarders(url, a, bodies, fwd_cpu))
        print(f"closing forwarder run: {fwd_rates[-1]:.0f} msg/s, "
              f"CPU per message {fwd_cpu[-1] / a.n * 1000:.3f} ms", flush=True)
    shutil.rmtree(logdir, ignore_errors=True)
    f_med, f_lo, f_hi = benchlib.median_spread(fwd_rates)
    r_med, r_lo, r_hi = benchlib.median_spread(router_rates)
    around = [(fwd_rates[r] + fwd_rates[r + 1]) / 2 for r in range(a.rounds)]
    around_cpu = [(fwd_cpu[r] + fwd_cpu[r + 1]) / 2 for r in range(a.rounds)]
    ratios = [r / f for r, f in zip(router_rates, around, strict=True)]
    print("ratio of each round to the mean of the forwarder runs before and after it: "
          + ", ".join(f"{q:.2f}" for q in ratios))
    q_med, q_lo, q_hi = benchlib.median_spread(ratios)
    print(f"forwarder: median {f_med:.0f} msg/s (min {f_lo:.0f}, max {f_hi:.0f})")
    print(f"router x{a.workers}: median {r_med:.0f} msg/s (min {r_lo:.0f}, max {r_hi:.0f})")
    print(f"ratio router/forwarder (the mean of the runs around it): median {q_med:.2f} "
          f"(min {q_lo:.2f}, max {q_hi:.2f})")
    c_med, c_lo, c_hi = benchlib.median_spread(
        [r / f for r, f in zip(router_cpu, around_cpu, strict=True)])
    print(f"CPU per message, router/forwarder: median {c_med:.2f} (min {c_lo:.2f}, "
          f"max {c_hi:.2f}); the forwarder's CPU is its process's, the router's its processes'")
    if fwdq_rates:
        m, lo, hi = benchlib.median_spread(fwdq_rates)
        print(f"forwarder on quorum queues: median {m:.0f} msg/s (min {lo:.0f}, max {hi:.0f}); "
              f"router/that: {r_med / m:.2f}")
    print(json.dumps({"forwarder": fwd_rates, "router": router_rates, "workers": a.workers,
                      "forwarder_quorum": fwdq_rates, "forwarder_cpu": fwd_cpu,
                      "router_cpu": router_cpu}))


async def purge(url: str, queue: str) -> None:
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        await q.purge()
    finally:
        await conn.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--customers", type=int, default=100_000)
    p.add_argument("-n", type=int, default=20_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--known", type=float, default=0.7)
    p.add_argument("--prefetch", type=int, default=256)
    p.add_argument("--database-url", default=None, help="an imported directory (default: SQLite)")
    p.add_argument("--quorum-forwarder", action="store_true",
                   help="also time the forwarder on quorum queues")
    p.add_argument("--calendars", action="store_true",
                   help="issue 15: hours, holidays and after-hours teams for every team, a "
                   "capacity for every agent (benchlib.calendars_on)")
    p.add_argument("--profile", help="py-spy the first router process into PROFILE.<round>.json")
    p.add_argument("--cache-ttl", type=float, default=None,
                   help="router.directory_cache_ttl (default: the setting's default)")
    p.add_argument("--ack", action="store_true",
                   help="issue 16: the routers acknowledge new conversations ([ack] defaults)")
    p.add_argument("--rules", type=int, default=0,
                   help="issue 20: this many [[routing.rules]] (throughput.topic_rules)")
    p.add_argument("--shadow", action="store_true",
                   help="issue 20: a shadow candidate of as many rules, differing for strangers")
    p.add_argument("--prose", action="store_true",
                   help="message texts of Turkish words instead of one long word (for --rules)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        asyncio.run(child(a.url, a.database_url, a.prefetch, a.cache_ttl, a.ack))
    else:
        os.environ.setdefault("PYTHONHASHSEED", "0")
        for key, on, value in (("RULES", a.rules, str(a.rules)), ("SHADOW", a.shadow, "1"),
                               ("PROSE", a.prose, "1")):
            if on:  # the router processes read them (routing_settings, make_body)
                os.environ[f"OMNIROUTE_BENCH_{key}"] = value
        asyncio.run(main(a))
