"""The status page (issue 17): the real daemon routes messages through the real broker, and
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium) opens
``/status`` with the token, as an operator would: connector states, the last decisions with
senders redacted, the decisions per minute, queue depths; a team id from the directory
holding ``<script>`` shows as text and runs nothing. Off by default (404), and never open
without the token (401)."""

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from config.logging import hide_secrets, scrub
from connectors.http import build_app
from connectors.settings import HttpSettings
from connectors.status import AskDepth, QueueDepths, StatusPage, StatusSources
from connectors.status_html import QueueReport, Redaction, Snapshot, render
from ingest.bus import Bus
from ingest.health import Health
from ingest.identities import redact
from ingest.metrics import Metrics
from ingest.recent import RecentDecisions
from ingest.schema import Identity, InboundMessage, Route, RoutedMessage
from ingest.topology import DEAD_QUEUE, INBOUND, ROUTED_QUEUE, ROUTER_QUEUE
from routers.models import Customer, CustomerIdentity, Team
from routers.store.engine import create_engine, sessionmaker
from tests.daemon_fixtures import DaemonProcess
from tests.seed import seeded
from tests.support.broker import take, wait_consumers
from tests.support.net import free_port, wait_listening
from tests.support.waiting import until

TOKEN = "status-page-test-token-0123456789"
HOSTILE = "<script>alert(1)</script>"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: where to copy the screenshot as well (docs/status-page.png is made this way)
SCREENSHOT_COPY = os.environ.get("OMNIROUTE_STATUS_SCREENSHOT")


def _configure(daemon: DaemonProcess, port: int, *, status: bool) -> None:
    text = daemon.config.read_text(encoding="utf-8").replace("port = 0", f"port = {port}")
    if status:
        text = text.replace(
            'host = "127.0.0.1"',
            f'host = "127.0.0.1"\nstatus_page = true\nstatus_token = "{TOKEN}"',
        )
    daemon.config.write_text(text, encoding="utf-8")


async def _directory(url: str) -> None:
    """The seed, plus a team whose id is hostile HTML and one customer of it."""
    await seeded(url)
    engine = create_engine(url)
    try:
        async with sessionmaker(engine).begin() as session:
            session.add(Team(id=HOSTILE, name="Hostile", dial=None, email=None))
            await session.flush()
            session.add(Customer(id="evil", name="Evil", team_id=HOSTILE))
            await session.flush()
            session.add(
                CustomerIdentity(kind="email", address="mallory@evil.test", customer_id="evil")
            )
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def _running(daemon: DaemonProcess, tmp_path: Path, bus: Bus) -> AsyncIterator[str]:
    """The daemon (router and HTTP) running; yields its base URL."""
    port = free_port()
    _configure(daemon, port, status=True)
    log = tmp_path / "daemon.log"
    proc = daemon.start("router", "events", log=log)
    try:
        await wait_listening(port, 20)
        await wait_consumers(bus, ROUTER_QUEUE, 1, 20)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 25) == 0
        assert "Traceback" not in log.read_text(errors="replace")


def mail(sender: str, n: int) -> InboundMessage:
    return InboundMessage(
        channel="email",
        external_id=f"<status-{n}@{sender}>",
        sender=Identity(kind="email", address=sender),
        subject="Merhaba",
    )


async def _depth(bus: Bus, queue: str) -> int:
    return (await bus.queue_depth(queue))[0]


async def _route(bus: Bus, messages: list[InboundMessage]) -> None:
    for message in messages:
        await bus.publish(INBOUND, message.channel, message, message_id=message.id)
    await take(bus, ROUTED_QUEUE, len(messages), 15)


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[WebDriver]:
    """Headless Chromium from Debian, through Debian's chromedriver: nothing downloaded,
    nothing contacted but the loopback page."""
    for binary in (CHROMIUM, CHROMEDRIVER):
        assert binary.exists(), "apt-get install chromium chromium-driver (./scripts/test does)"
    profile.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,1700",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-domain-reliability",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(profile / "driver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _section(driver: WebDriver, name: str) -> list[list[str]]:
    """The body rows of section ``name``'s table, each as its cells' text."""
    rows = driver.find_elements(By.CSS_SELECTOR, f'section[aria-labelledby="{name}"] tbody tr')
    return [[cell.text for cell in row.find_elements(By.CSS_SELECTOR, "th, td")] for row in rows]


def _look(driver: WebDriver, url: str, shot: Path) -> dict[str, Any]:
    """Open the page with the token (HTTP Basic in the URL, as a browser's prompt sends it)
    and read what an operator reads."""
    driver.get(url.replace("http://", f"http://ops:{TOKEN}@") + "/status")
    found: dict[str, Any] = {
        "lang": driver.find_element(By.TAG_NAME, "html").get_attribute("lang"),
        "title": driver.title,
        "components": {row[0]: row[1] for row in _section(driver, "components")},
        "decisions": _section(driver, "decisions"),
        "traffic": _section(driver, "traffic"),
        "all": driver.find_element(
            By.CSS_SELECTOR, 'section[aria-labelledby="traffic"] tfoot td:last-child'
        ).text,
        "queues": {row[0]: row[1:] for row in _section(driver, "queues")},
        "dead": _section(driver, "dead"),
        "dead_text": driver.find_element(By.CSS_SELECTOR, 'section[aria-labelledby="dead"]').text,
        "captions": len(driver.find_elements(By.TAG_NAME, "caption")),
        "tables": len(driver.find_elements(By.TAG_NAME, "table")),
        "unscoped": len(driver.find_elements(By.CSS_SELECTOR, "th:not([scope])")),
        "scripts": len(driver.find_elements(By.TAG_NAME, "script")),
        "source": driver.page_source,
    }
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1200, int(height) + 140)  # the whole page in the screenshot
    assert driver.save_screenshot(str(shot))
    try:
        driver.switch_to.alert  # noqa: B018 -- raises when no alert is open
        found["alert"] = True
    except NoAlertPresentException:
        found["alert"] = False
    return found


async def test_status_page_in_chromium_shows_states_decisions_and_counts(
    daemon: DaemonProcess, bus: Bus, sqlite_url: str, tmp_path: Path
) -> None:
    """What an operator opens first: every number on it comes from the running daemon, the
    senders are redacted, and a directory value holding HTML is shown, never run."""
    await _directory(sqlite_url)
    sent = [
        mail("ayse@acme.test", 1),
        InboundMessage(
            channel="sms",
            external_id="SM-status-1",
            sender=Identity(kind="phone", address="+905321112233"),
        ),
        mail("it@globex.test", 2),
        mail("stranger@nowhere.test", 3),
    ]
    async with _running(daemon, tmp_path, bus) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            bare = await client.get("/status")
            wrong = await client.get("/status", headers={"Authorization": "Bearer nope"})
            basic = await client.get("/status", auth=("ops", "wrong-token-of-16+"))
        assert (bare.status_code, wrong.status_code, basic.status_code) == (401, 401, 401)
        assert 'Basic realm="omniroute status"' in bare.headers.get_list("www-authenticate")
        assert TOKEN not in bare.text

        await _route(bus, sent)
        await bus.publish_body(INBOUND, "email", b"{not json", message_id="poison-1", type_=None)
        await until(lambda: _depth(bus, DEAD_QUEUE), 15, "the poison message dead-lettered")
        with chromium(tmp_path / "chromium") as driver:
            shot = tmp_path / "status.png"
            page = await asyncio.to_thread(_look, driver, url, shot)
            assert shot.stat().st_size > 10_000
            if SCREENSHOT_COPY:
                shutil.copyfile(shot, SCREENSHOT_COPY)

            assert page["lang"] == "en"
            assert page["title"].startswith("omniroute status")
            components = page["components"]
            assert components["router"] == "up"
            assert components["broker"] == "up"
            decisions = page["decisions"]
            assert sorted((d[1], d[2], d[3], d[4], d[5]) for d in decisions) == [
                ("email", "a***@acme.test", "team.billing", "dedicated_team", "1"),
                ("email", "i***@globex.test", "team.network", "dedicated_team", "1"),
                ("email", "s***@nowhere.test", "triage", "unknown_sender", "1"),
                ("sms", "***2233", "team.billing", "dedicated_team", "1"),
            ]
            source = str(page["source"])
            for identity in ("ayse@acme.test", "+905321112233", "stranger@", "it@globex"):
                assert identity not in source
            assert page["all"] == "4"
            totals = {(row[0], row[1]): row[-1] for row in page["traffic"]}
            assert totals == {
                ("email", "dedicated_team"): "2",
                ("email", "unknown_sender"): "1",
                ("sms", "dedicated_team"): "1",
            }
            queues = page["queues"]
            assert set(queues) == {
                "omniroute.router",
                "omniroute.routed",
                "omniroute.outbound",
                "omniroute.events",
                "omniroute.dead",
            }
            assert queues["omniroute.router"][1] == "1"  # the router consumes
            assert queues["omniroute.dead"][0] == "1"
            assert "omniroute.dead holds 1 message now" in str(page["dead_text"])
            assert [row[1] for row in page["dead"]] == ["1"]
            assert page["captions"] == page["tables"] == 5
            assert page["unscoped"] == 0
            assert page["scripts"] == 0

            await _route(bus, [mail("mallory@evil.test", 4)])
            hostile = await asyncio.to_thread(_look, driver, url, tmp_path / "hostile.png")
        newest = hostile["decisions"][0]
        assert newest[3] == f"team.{HOSTILE}", "shown as text"
        assert hostile["scripts"] == 0
        assert hostile["alert"] is False
        assert "<script>alert" not in str(hostile["source"])


async def test_status_page_is_off_by_default(
    daemon: DaemonProcess, bus: Bus, sqlite_url: str
) -> None:
    """Without http.status_page the daemon has no /status at all, token or not."""
    await seeded(sqlite_url)
    port = free_port()
    _configure(daemon, port, status=False)
    proc = daemon.start("router")
    try:
        await wait_listening(port, 20)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            bare = await client.get("/status")
            bearer = await client.get("/status", headers={"Authorization": f"Bearer {TOKEN}"})
            healthz = await client.get("/healthz")
        assert (bare.status_code, bearer.status_code, healthz.status_code) == (404, 404, 200)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 25) == 0


@pytest.fixture(autouse=True)
def _no_selenium_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Selenium Manager is never needed (both paths are given); should it run, offline."""
    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("SE_AVOID_STATS", "true")


def _page(
    health: Health, recent: RecentDecisions | None, token: str | None, ask: AskDepth
) -> tuple[StatusPage, httpx.AsyncClient]:
    redaction = Redaction(redact, scrub, hide_secrets, lambda: True)
    depths = QueueDepths(ask, ["omniroute.router", "omniroute.dead"], scrub=redaction.text)
    page = StatusPage(
        StatusSources(health, Metrics(), depths, recent), token=token, redaction=redaction
    )
    app = build_app(health=health, metrics=Metrics(), http=HttpSettings(), routers=[page.router])
    return page, httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def _zero(queue: str) -> tuple[int, int]:
    return 0, 0


async def test_without_a_token_configured_the_page_refuses_everyone() -> None:
    """http.status_page on but neither http.status_token nor api.token set: 401 whatever
    is sent, never an open page."""
    page, client = _page(Health(), None, None, _zero)
    async with client:
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Basic Og=="}):
            assert (await client.get("/status", headers=headers)).status_code == 401
    await page.close()


async def test_queue_depths_are_cached_and_a_slow_broker_does_not_hold_the_page() -> None:
    """The broker is asked at most once per ttl, by one task; a request waits for it about
    ``wait`` seconds and then shows the last depths known."""
    asked: list[str] = []
    answer = asyncio.Event()

    async def ask(queue: str) -> tuple[int, int]:
        asked.append(queue)
        await answer.wait()
        return 7, 1

    depths = QueueDepths(ask, ["omniroute.router"], scrub=str, ttl=60, wait=0.05)
    first = await asyncio.wait_for(depths.get(), 1)
    assert (first.at, first.depths) == (None, ())
    answer.set()
    await until(lambda: depths._task is not None and depths._task.done(), 5, "the answer")
    second = await depths.get()
    assert second.depths == (("omniroute.router", 7, 1),)
    assert second.problem is None
    assert asked == ["omniroute.router"], "asked once within the ttl"
    await depths.close()


def test_recent_decisions_are_bounded() -> None:
    """50 decisions and 5 minutes, however many are routed."""
    now = [600_000.0]
    recent = RecentDecisions(clock=lambda: now[0])
    for n in range(600):
        now[0] += 1.0  # ten minutes of one decision a second
        channel = "sms" if n % 2 else "email"
        recent.add(_routed(channel, f"user{n}@acme.test", "triage"))
    assert len(recent.last()) == 50
    assert recent.last()[0].sender == "user599@acme.test"
    minutes = recent.per_minute()
    assert len(minutes) == 5
    assert [sum(m.counts.values()) for m in minutes[:-1]] == [60, 60, 60, 60]


def test_the_page_is_escaped_and_bounded_whatever_the_input() -> None:
    """Hostile and huge values from the directory or a component's reason are escaped and
    cut: no markup gets through and the page stays small."""
    health = Health()
    for n in range(500):
        health.set(f"<img src=x onerror=alert({n})>" * 20, "down", "<script>x</script>" * 200)
    recent = RecentDecisions()
    for n in range(200):
        recent.add(_routed("email", f"<b>{n}</b>@evil.test", "<script>" * 20))
    report = QueueReport(at=None, depths=(), problem="<script>" * 500)
    snapshot = Snapshot(
        1.8e9,
        False,
        ["<i>x</i>"] * 500,
        health.snapshot(),
        recent,
        report,
        "reason",
        [("<u>", 1)] * 500,
    )
    text = render(
        snapshot, Redaction(redact, scrub, hide_secrets, lambda: True), nonce="n", refresh=None
    )
    assert len(text.encode()) < 200_000
    for markup in ("<script", "<img", "<b>", "<i>", "<u>"):
        assert markup not in text
    assert "http-equiv" not in text, "refresh=0 means no reload"


def _routed(channel: str, sender: str, target: str) -> RoutedMessage:
    kind = "phone" if channel == "sms" else "email"
    message = InboundMessage(
        channel=channel,
        external_id=sender,
        sender=Identity(kind=kind, address=sender),
    )
    return RoutedMessage(
        message=message, route=Route(kind="team", target=target, reason="dedicated_team")
    )
