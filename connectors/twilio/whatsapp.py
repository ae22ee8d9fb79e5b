"""WhatsApp replies through Twilio's Messages API: the SMS sender with ``whatsapp:``
addresses, from ``twilio.whatsapp_from`` (else ``from_number``). Outside the 24-hour
customer-care window Twilio refuses free-form text (error 63016): a ``PermanentSendError``
with code ``outside_session_window``, so ``outbound.failed`` says exactly that."""

from connectors.twilio.addresses import WHATSAPP
from connectors.twilio.sms import TwilioSmsSender


class TwilioWhatsAppSender(TwilioSmsSender):
    """The outbound dispatcher's ``Sender`` for channel ``whatsapp``."""

    channel = "whatsapp"
    prefix = WHATSAPP

    def _from(self) -> str:
        return str(self._settings.whatsapp_from or self._settings.from_number)
