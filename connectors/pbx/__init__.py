"""Caller-ID routing for any PBX (Asterisk, FreeSWITCH, Kamailio): the ``/v1/route`` API in
``routes``; the decision and the safe dial string it shares with the Twilio voice webhook are
``connectors.calls``'. Importing the package loads nothing."""
