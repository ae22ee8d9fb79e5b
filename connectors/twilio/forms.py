"""What a Twilio webhook's form must be before it is believed, and reading its fields.

Invariants: every request is checked with twilio's ``RequestValidator`` against
``http.public_url`` + path + query (403 otherwise, also when no auth token is configured),
then refused (403) unless shaped as Twilio sends it: no repeated parameter, SIDs of
Twilio's format, the configured ``account_sid`` (the signature alone does not bind these).
"""

import re
from collections import Counter
from typing import Annotated, Any

import structlog
from fastapi import Header, HTTPException, Request, Response
from starlette.datastructures import FormData
from twilio.request_validator import (
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)
from twilio.twiml.messaging_response import MessagingResponse
from twilio.twiml.voice_response import VoiceResponse

from connectors.calls import MAX_FIELD, phone_identity
from connectors.settings import HttpSettings, TwilioSettings
from ingest.schema import Attachment, Identity

log = structlog.get_logger("omniroute.twilio")

MAX_MEDIA = 10  # Twilio sends at most 10 media items per message
#: Twilio's documented SID shapes: two letters naming the resource, 32 lowercase hex digits
SID_FORMATS = {
    "MessageSid": re.compile(r"(SM|MM)[0-9a-f]{32}"),
    "CallSid": re.compile(r"CA[0-9a-f]{32}"),
    "AccountSid": re.compile(r"AC[0-9a-f]{32}"),
}
SignatureHeader = Annotated[
    str | None,
    Header(alias="X-Twilio-Signature", description="HMAC of the URL and parameters"),
]
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/xml": {}}, "description": "TwiML"},
    400: {"description": "a required parameter is missing"},
    403: {
        "description": "missing or invalid X-Twilio-Signature, or a form Twilio never sends: "
        "a repeated parameter, a malformed SID, another account's AccountSid"
    },
    503: {"description": "the message could not be made safe; Twilio retries"},
}


def form_body(*required: str) -> dict[str, Any]:
    """The OpenAPI request body of a Twilio webhook (FastAPI cannot see a raw form)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "properties": {name: _form_field(name) for name in required},
                        "required": list(required),
                        "additionalProperties": {"type": "string"},
                    }
                }
            },
        }
    }


def _form_field(name: str) -> dict[str, Any]:
    sid = SID_FORMATS.get(name)
    return {"type": "string"} | ({"pattern": f"^{sid.pattern}$"} if sid else {})


class SignedForms:
    """Sole purpose: hand a webhook its form only once Twilio signed it and shaped it."""

    def __init__(self, settings: TwilioSettings, http: HttpSettings) -> None:
        token = settings.auth_token
        self._validator = RequestValidator(token.get_secret_value()) if token else None
        self._public_url = http.public_url
        self._account_sid = settings.account_sid

    async def verified(self, request: Request, signature: str | None, sid: str) -> FormData:
        """The form, once signed by Twilio and shaped as Twilio sends it; ``sid`` names the
        endpoint's own SID parameter (``MessageSid`` or ``CallSid``)."""
        urlencoded = request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        )
        form = await request.form() if urlencoded else FormData()
        if self._validator is None or not signature:
            raise HTTPException(403, "missing X-Twilio-Signature")
        url = str(request.url)
        if self._public_url:
            url = self._public_url + request.url.path
            if request.url.query:
                url += "?" + request.url.query
        algorithm = get_signature_algorithm(request.headers.get(SIGNATURE_SETTINGS_HEADER))
        if not self._validator.validate(url, form, signature, algorithm):
            log.warning("twilio.bad_signature", path=request.url.path)
            raise HTTPException(403, "invalid X-Twilio-Signature")
        problem = not_as_twilio_sends(form, sid, self._account_sid)
        if problem is not None:
            log.warning("twilio.refused_form", path=request.url.path, problem=problem)
            raise HTTPException(403, f"not a request Twilio sends: {problem}")
        return form


def not_as_twilio_sends(form: FormData, sid: str, account_sid: str | None) -> str | None:
    """Why a signed form cannot be one Twilio sent, or None.

    The signature does not bind a form's shape: it is an HMAC of the URL followed by name +
    value for every value, names sorted, a repeated name's values deduplicated and sorted
    (twilio's ``RequestValidator``), with no separator. So a captured request can be re-cut
    and keep its signature: a text whose Body ends in ``From<victim>`` re-sent with that
    Body cut short and ``From=<sender>&From=<victim>`` hashes the same, and Starlette reads
    the last From; a value can take in the next parameter (``MessageSid=<sid>NumMedia0``
    without ``NumMedia`` is a new MessageSid, past the dedup). Twilio never repeats a name
    (media are ``MediaUrl0``, ``MediaUrl1``…) and its SIDs have one documented shape, so
    anything else is refused (403, as a forgery: Twilio does not retry a 4xx either way).
    """
    counts = Counter(name for name, _ in form.multi_items())
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        return f"parameter {repeated[0][:40]!r} given more than once"
    for name, pattern in ((sid, SID_FORMATS[sid]), ("AccountSid", SID_FORMATS["AccountSid"])):
        value = text(form, name)
        if value and not pattern.fullmatch(value):
            return f"{name} is not a Twilio SID"
    if account_sid and text(form, "AccountSid") not in ("", account_sid):
        return "AccountSid is not twilio.account_sid"
    return None


def text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def required(form: FormData, name: str) -> str:
    value = text(form, name).strip()
    if not value:
        raise HTTPException(400, f"missing {name}")
    if len(value) > MAX_FIELD:
        raise HTTPException(400, f"{name} is longer than {MAX_FIELD} characters")
    return value


def optional_identity(form: FormData, name: str, region: str) -> Identity | None:
    value = text(form, name).strip()
    return phone_identity(value, region) if value else None


def meta(form: FormData, names: dict[str, str]) -> dict[str, Any]:
    return {key: text(form, name)[:MAX_FIELD] for name, key in names.items() if text(form, name)}


def media(form: FormData) -> list[Attachment]:
    try:
        count = min(int(text(form, "NumMedia") or 0), MAX_MEDIA)
    except ValueError:
        count = 0
    found = []
    for i in range(max(count, 0)):
        url = text(form, f"MediaUrl{i}")
        if url.startswith(("https://", "http://")):
            kind = text(form, f"MediaContentType{i}") or "application/octet-stream"
            found.append(Attachment(content_type=kind[:200], size=0, url=url[:2048]))
    return found


def twiml(reply: VoiceResponse | MessagingResponse) -> Response:
    return Response(str(reply), media_type="application/xml")
