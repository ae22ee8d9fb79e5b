"""Twilio's Messages resource on loopback, answering like the documented API."""

import asyncio
import base64

from aiohttp import web

from tests.phone_fixtures import ACCOUNT_SID, AUTH_TOKEN


class FakeTwilioApi:
    """Twilio's Messages resource on loopback, answering like the documented API (SMS and
    WhatsApp alike: a WhatsApp message is the same resource with ``whatsapp:`` addresses)."""

    INVALID = "+15005550001"  # Twilio's magic "invalid number" test value
    BROKEN = "+15005550009"  # answered 503 here

    def __init__(self) -> None:
        #: WhatsApp addresses whose 24-hour customer-care window is closed (error 63016)
        self.closed_sessions: set[str] = set()
        self.requests: list[dict[str, str]] = []
        self.auth: list[str | None] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/2010-04-01/Accounts/{sid}/Messages.json", self._create)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _create(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.requests.append(form)
        self.auth.append(request.headers.get("Authorization"))
        sid = request.match_info["sid"]
        to = form.get("To", "")
        expected = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
        if request.headers.get("Authorization") != expected:
            return web.json_response(
                {
                    "code": 20003,
                    "message": "Authenticate",
                    "more_info": "https://www.twilio.com/docs/errors/20003",
                    "status": 401,
                },
                status=401,
            )
        if to == self.INVALID:
            return web.json_response(
                {
                    "code": 21211,
                    "message": f"The 'To' number {to} is not a valid phone number.",
                    "more_info": "https://www.twilio.com/docs/errors/21211",
                    "status": 400,
                },
                status=400,
            )
        if to in self.closed_sessions:
            return web.json_response(
                {
                    "code": 63016,
                    "message": "Failed to send freeform message because you are outside the "
                    "allowed window. If you are using WhatsApp, please use a Message Template.",
                    "more_info": "https://www.twilio.com/docs/errors/63016",
                    "status": 400,
                },
                status=400,
            )
        if to == self.BROKEN:
            return web.json_response(
                {
                    "code": 20500,
                    "message": "An internal server error has occurred",
                    "more_info": "https://www.twilio.com/docs/errors/20500",
                    "status": 500,
                },
                status=503,
            )
        message_sid = "SM" + "a" * 32
        now = "Thu, 24 Aug 2023 05:01:45 +0000"
        return web.json_response(
            {
                "account_sid": sid,
                "api_version": "2010-04-01",
                "body": form.get("Body", ""),
                "date_created": now,
                "date_sent": None,
                "date_updated": now,
                "direction": "outbound-api",
                "error_code": None,
                "error_message": None,
                "from": form.get("From"),
                "messaging_service_sid": None,
                "num_media": "0",
                "num_segments": "1",
                "price": None,
                "price_unit": "USD",
                "sid": message_sid,
                "status": "queued",
                "subresource_uris": {
                    "media": f"/2010-04-01/Accounts/{sid}/Messages/{message_sid}/Media.json"
                },
                "to": to,
                "uri": f"/2010-04-01/Accounts/{sid}/Messages/{message_sid}.json",
            },
            status=201,
        )
