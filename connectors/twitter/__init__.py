"""The X (Twitter) channel: mentions and DMs in by polling X's API v2 (``intake``), replies
and DMs out (``sender``); ``api`` is the HTTP client, ``messages`` turns X's items into
messages."""

from connectors.twitter.intake import TwitterConnector
from connectors.twitter.sender import TwitterSender

__all__ = ["TwitterConnector", "TwitterSender"]
