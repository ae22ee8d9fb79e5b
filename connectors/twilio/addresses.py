"""Which Messaging channel a Twilio address belongs to: Twilio writes a WhatsApp number as
``whatsapp:+E164`` in webhooks, status callbacks and the Messages API alike."""

from typing import Literal

WHATSAPP = "whatsapp:"
#: Twilio error codes with a stable meaning for the ticket system (``outbound.failed``'s
#: reason): 63016, a free-form WhatsApp message outside the 24-hour customer-care window
#: (https://www.twilio.com/docs/errors/63016); only an approved template may be sent then.
ERROR_REASONS = {"63016": "outside_session_window"}


def split(address: str) -> tuple[Literal["sms", "whatsapp"], str]:
    """The channel of ``address`` and the number without its prefix."""
    if address[: len(WHATSAPP)].casefold() == WHATSAPP:
        return "whatsapp", address[len(WHATSAPP) :]
    return "sms", address
