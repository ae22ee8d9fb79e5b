"""Twilio: SMS, WhatsApp and Voice webhooks in (``webhooks``: messaging, voice, status
callbacks, each form verified by ``forms``), SMS and WhatsApp replies out (``sms``,
``whatsapp``), delivery failures as events."""

from connectors.twilio.sms import STATUS_PATH, TwilioSmsSender
from connectors.twilio.webhooks import SMS_PATH, VOICE_PATH, TwilioRoutes
from connectors.twilio.whatsapp import TwilioWhatsAppSender

__all__ = [
    "SMS_PATH",
    "STATUS_PATH",
    "VOICE_PATH",
    "TwilioRoutes",
    "TwilioSmsSender",
    "TwilioWhatsAppSender",
]
