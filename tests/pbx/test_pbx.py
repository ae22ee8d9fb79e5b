"""The caller-ID route API for any PBX, over HTTP, on the real directory and broker."""

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from xml.etree import ElementTree

import httpx
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.http import build_app
from connectors.pbx.routes import PbxRoutes
from connectors.settings import ApiSettings, HttpSettings
from ingest.errors import TransientError
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.protocols import Decision
from ingest.schema import InboundMessage
from ingest.topology import ROUTER_QUEUE
from routers import state
from routers.csv.importer import import_csv
from routers.models import Team
from routers.settings import RoutingSettings
from routers.store.engine import sessionmaker
from tests.phone_fixtures import (
    ACME_PHONE,
    AGENT_DIAL,
    API_TOKEN,
    DEFAULT_DIAL,
    REGION,
    TEAM_DIAL,
    AppFactory,
    call,
    dial_of,
)
from tests.support.broker import take


async def test_route_answers_json_and_publishes_the_call(make_phones: AppFactory) -> None:
    """A PBX gets the customer, the route with its reason, and the dial string."""
    phones = await make_phones()
    response = await phones.route(caller="0532 111 22 33", called="+902125550000", call_id="c1")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["customer"]["id"] == "c-acme"
    assert body["route"] == {"kind": "team", "target": "t-istanbul", "reason": "dedicated_team"}
    assert body["dial"] == TEAM_DIAL
    [delivery] = await take(phones.bus, ROUTER_QUEUE, 1)
    message = InboundMessage.model_validate_json(delivery.body)
    assert (message.channel, message.external_id) == ("voice", "c1")
    assert message.sender.address == ACME_PHONE
    # the PBX asking again for the same call does not publish it twice
    await phones.route(caller="0532 111 22 33", call_id="c1")
    assert await phones.bus.queue_depth(ROUTER_QUEUE) == (0, 0)


async def test_route_answers_plain_dial_string(make_phones: AppFactory) -> None:
    """Asterisk's Dial(${CURL(...)}) needs the bare dial string."""
    phones = await make_phones()
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    by_accept = await phones.client.get(
        "/v1/route", params={"caller": ACME_PHONE}, headers={**auth, "Accept": "text/plain"}
    )
    by_format = await phones.client.get(
        "/v1/route", params={"caller": ACME_PHONE, "format": "text"}, headers=auth
    )
    posted = await phones.client.post(
        "/v1/route?format=text", data={"caller": ACME_PHONE}, headers=auth
    )
    for response in (by_accept, by_format, posted):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert response.text == TEAM_DIAL
    withheld = await phones.route(caller="anonymous", format="text")
    assert withheld.text == DEFAULT_DIAL


async def test_route_requires_the_bearer_token(make_phones: AppFactory) -> None:
    """Without api.token nobody learns which team serves which number."""
    phones = await make_phones()
    missing = await phones.client.get("/v1/route", params={"caller": ACME_PHONE})
    wrong = await phones.client.get(
        "/v1/route", params={"caller": ACME_PHONE}, headers={"Authorization": "Bearer nope"}
    )
    basic = await phones.client.get(
        "/v1/route", params={"caller": ACME_PHONE}, headers={"Authorization": "Basic eDp5"}
    )
    assert [r.status_code for r in (missing, wrong, basic)] == [401, 401, 401]
    no_caller = await phones.client.get(
        "/v1/route", headers={"Authorization": f"Bearer {API_TOKEN}"}
    )
    assert no_caller.status_code == 400
    assert "caller" in no_caller.json()["detail"]


async def test_route_never_answers_an_injected_dial_string(make_phones: AppFactory) -> None:
    """A directory entry holding dialplan syntax must not reach the PBX."""
    phones = await make_phones()
    async with phones.engine.begin() as conn:
        await conn.execute(
            update(Team)
            .where(Team.id == "t-istanbul")
            .values(dial="SIP/desk&Local/s@evil,${SHELL(id)}|x")
        )
    text = await phones.route(caller=ACME_PHONE, format="text")
    assert text.status_code == 200
    assert text.text == DEFAULT_DIAL
    body = (await phones.route(caller=ACME_PHONE)).json()
    assert body["dial"] == DEFAULT_DIAL
    assert body["route"]["target"] == "t-istanbul"


async def test_route_with_failed_verstat_never_dials_an_agent(make_phones: AppFactory) -> None:
    """Issue 13: a caller ID the carrier could not verify gets the team, without the
    customer's context, by the fast path (GET) and by FastAPI's route (POST form) alike."""
    phones = await make_phones(
        routing=RoutingSettings(
            default_region=REGION, sticky_channels=["email", "sms", "twitter", "voice"]
        )
    )
    async with sessionmaker(phones.engine).begin() as session:
        await state.record_reply(
            session, agent_id="a-ayse", customer_id="c-acme", channel="sms", at=datetime.now(UTC)
        )
    verified = (await phones.route(caller=ACME_PHONE, verstat="TN-Validation-Passed-A")).json()
    assert (verified["route"]["reason"], verified["dial"]) == ("last_agent", AGENT_DIAL)

    failed = "TN-Validation-Failed-B"
    fast = await phones.route(caller=ACME_PHONE, call_id="v1", verstat=failed)
    posted = await phones.client.post(
        "/v1/route",
        data={"caller": ACME_PHONE, "call_id": "v2", "verstat": failed},
        headers={"Authorization": f"Bearer {API_TOKEN}"},
    )
    for response in (fast, posted):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["route"] == {
            "kind": "team",
            "target": "t-istanbul",
            "reason": "unverified_sender",
        }
        assert (body["dial"], body["fallback_dial"]) == (TEAM_DIAL, None)
        assert body["customer"] is None, "a spoofer learns nothing of the customer"
    deliveries = await take(phones.bus, ROUTER_QUEUE, 3)
    metas = {m.external_id: m.meta for m in map(_inbound, deliveries)}
    assert metas["v1"]["stir_verstat"] == metas["v2"]["stir_verstat"] == failed


def _inbound(delivery: object) -> InboundMessage:
    return InboundMessage.model_validate_json(delivery.body)  # type: ignore[attr-defined]


async def test_route_openapi_documents_the_endpoints(make_phones: AppFactory) -> None:
    """The OpenAPI document is served and names every public endpoint."""
    phones = await make_phones()
    spec = (await phones.client.get("/openapi.json")).json()
    for path in (
        "/v1/route",
        "/webhooks/twilio/sms",
        "/webhooks/twilio/voice",
        "/webhooks/twilio/status",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert path in spec["paths"], path
    assert set(spec["paths"]["/v1/route"]) == {"get", "post"}


class _Unavailable:
    """A decider whose directory is away: every decision fails as an outage."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, message: InboundMessage) -> Decision:
        return (await self.decide_many([message]))[0]

    async def decide_many(
        self, messages: Sequence[InboundMessage], *, context: bool = True
    ) -> list[Decision]:
        self.calls += 1
        raise TransientError("directory database: away")


async def test_both_ways_in_answer_alike_when_no_decision_can_be_taken() -> None:
    """The fast path (GET) and the FastAPI route (POST, another spelling of the scheme)
    give the same 503 without a default dial, and each asks the decider once."""
    decider = _Unavailable()
    metrics = Metrics()
    pbx = PbxRoutes(
        settings=ApiSettings(token=API_TOKEN),
        decider=decider,
        sink=_Nowhere(),
        metrics=metrics,
        region="TR",
    )
    app = build_app(
        health=Health(),
        metrics=metrics,
        http=HttpSettings(port=0),
        routers=[pbx.router],
        fast_paths=[pbx.fast_path],
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        query = {"caller": ACME_PHONE}
        fast = await client.get(
            "/v1/route", params=query, headers={"Authorization": f"Bearer {API_TOKEN}"}
        )
        framework = await client.get(  # another spelling of the scheme: FastAPI's route
            "/v1/route", params=query, headers={"Authorization": f"bearer {API_TOKEN}"}
        )
    assert fast.status_code == framework.status_code == 503
    assert fast.content == framework.content == b'{"detail":"no routing decision can be taken now"}'
    assert fast.headers["content-type"] == framework.headers["content-type"]
    assert decider.calls == 2


class _Nowhere:
    async def submit(self, message: InboundMessage) -> None:
        raise AssertionError("a call without a decision is not recorded")


async def test_a_closed_team_answers_its_after_hours_dial(
    make_phones: AppFactory, engine: AsyncEngine, tmp_path: Path
) -> None:
    """Issue 15: a caller whose team is closed hears its after-hours dial (voicemail), on
    /v1/route as on the Twilio voice webhook; the route says when the team opens."""
    phones = await make_phones()
    teams = tmp_path / "closed.csv"
    teams.write_text(
        "id,name,dial,email,timezone,hours,after_hours_dial\n"
        "t-istanbul,Istanbul,+902125550100,istanbul@example.test,Europe/Istanbul,"
        "closed,sip:voicemail-istanbul@pbx.example.test\n"
    )
    report = await import_csv(engine, teams, kind=None, region=REGION, dry_run=False)
    assert not report.rejects, report.rejects
    text = await phones.route(caller=ACME_PHONE, format="text")
    assert text.text == "sip:voicemail-istanbul@pbx.example.test"
    body = (await phones.route(caller=ACME_PHONE, call_id="c-closed")).json()
    assert body["route"]["target"] == "t-istanbul"
    assert body["dial"] == "sip:voicemail-istanbul@pbx.example.test"
    twiml = await phones.twilio("/webhooks/twilio/voice", call("CA" + "7" * 32))
    assert twiml.status_code == 200, twiml.text
    assert dial_of(twiml.text)[1] == [("Sip", "sip:voicemail-istanbul@pbx.example.test")]


async def test_route_post_reads_format_from_the_form_body(make_phones: AppFactory) -> None:
    """Issue 17: every field may travel in a POST's form body, ``format`` too; the query
    string wins where both name it, as for the other fields."""
    phones = await make_phones()
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    text = await phones.client.post(
        "/v1/route", data={"caller": ACME_PHONE, "format": "text"}, headers=auth
    )
    assert text.status_code == 200, text.text
    assert text.headers["content-type"].startswith("text/plain")
    assert text.text == TEAM_DIAL
    by_query = await phones.client.post(
        "/v1/route?format=json", data={"caller": ACME_PHONE, "format": "text"}, headers=auth
    )
    assert by_query.json()["dial"] == TEAM_DIAL
    wrong = await phones.client.post(
        "/v1/route", data={"caller": ACME_PHONE, "format": "xml"}, headers=auth
    )
    assert wrong.status_code == 422


def _freeswitch_dialplan() -> ElementTree.Element:
    """docs/PBX.md's FreeSWITCH extensions, parsed."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "PBX.md").read_text()
    section = doc.split("## FreeSWITCH", 1)[1].split("\n## ", 1)[0]
    block = section.split("```xml\n", 1)[1].split("```", 1)[0]
    return ElementTree.fromstring(f"<context>{block}</context>")  # noqa: S314 -- our own doc


async def test_freeswitch_example_bridges_a_dial_string_with_a_colon(
    make_phones: AppFactory,
) -> None:
    """Issue 17: the guide's FreeSWITCH example once read the answer through ``cond(… ? … :
    …)``, which cuts a dial string at its first ``:``. The example now only tests the answer
    with regular expressions and bridges it whole; here its expressions meet the real text
    answers (FreeSWITCH itself is not packaged in Debian)."""
    dialplan = _freeswitch_dialplan()
    assert "cond(" not in ElementTree.tostring(dialplan, encoding="unicode")
    [ask] = dialplan.findall("extension[@name='omniroute']")
    [curl] = ask.findall(".//action[@application='curl']")
    assert "format=text" in curl.attrib["data"]
    assert "caller=${url_encode(${caller_id_number})}" in curl.attrib["data"]
    [transfer] = ask.findall(".//action[@application='transfer']")
    [dial] = dialplan.findall("extension[@name='omniroute-dial']")
    assert transfer.attrib["data"].split()[0] == "omniroute-dial"
    [tests] = dial.findall("condition[@regex='all']")
    expressions = {r.attrib["field"]: r.attrib["expression"] for r in tests.findall("regex")}
    [bridge] = tests.findall("action[@application='bridge']")
    [fallback] = tests.findall("anti-action[@application='bridge']")
    assert bridge.attrib["data"] == "${curl_response_data}"
    assert fallback.attrib["data"]

    def bridged(code: int, body: str) -> str:
        """What the dialplan bridges to, given mod_curl's two variables."""
        found = {"${curl_response_code}": str(code), "${curl_response_data}": body}
        passed = all(re.search(expr, found[name]) for name, expr in expressions.items())
        return body if passed else fallback.attrib["data"]

    phones = await make_phones()
    sip = await phones.route(caller="+905321112244", format="text")
    assert sip.text == "sip:desk@pbx.example.test"
    assert bridged(sip.status_code, sip.text) == "sip:desk@pbx.example.test"
    team = await phones.route(caller=ACME_PHONE, format="text")
    assert bridged(team.status_code, team.text) == TEAM_DIAL
    assert bridged(200, "") == fallback.attrib["data"]
    assert (
        bridged(503, '{"detail":"no routing decision can be taken now"}')
        == (fallback.attrib["data"])
    )
