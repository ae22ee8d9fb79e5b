"""What a message says about its sender's authenticity, and when the sender counts as proven.

Sole purpose: one reading of ``meta.auth`` (email: the SPF, DKIM and DMARC results a
trusted receiving server wrote, see ``connectors.email.authresults``) and ``meta.stir_verstat``
(voice: the carrier's STIR/SHAKEN verdict on the caller ID) for the policy and
``route explain``. It lives in ``ingest`` because it is part of the message contract, which
``connectors`` write and ``routers`` read (they never import each other).

``meta`` comes from any publisher on ``omniroute.inbound``, so nothing here trusts its
shape: a value that is not what it should be counts as "no pass", and text taken from it
is bounded before it reaches a step.
"""

from collections.abc import Mapping
from typing import Any

METHODS = ("spf", "dkim", "dmarc")
#: Twilio's StirVerstat values that mean the caller-ID signature was checked and failed
#: (``TN-Validation-Failed-A``/``-B``/``-C``); ``No-TN-Validation`` is not a failure.
VERSTAT_FAILED = "tn-validation-failed"
_SHOWN = 40  # characters of a result or id shown in a step


def verified(auth: Mapping[str, str] | None) -> bool:
    """True iff DMARC passed, or DMARC did not fail and SPF or DKIM passed.

    A mail that fails DMARC is not verified whatever SPF and DKIM say (DMARC is the check
    that ties them to the From address); a mail with no pass at all, or with no results from
    a trusted server (``auth`` None), is not verified either."""
    if not isinstance(auth, Mapping):
        return False
    dmarc = _result(auth, "dmarc")
    if dmarc == "pass":
        return True
    if dmarc == "fail":
        return False
    return _result(auth, "spf") == "pass" or _result(auth, "dkim") == "pass"


def describe(auth: Mapping[str, str] | None) -> str:
    """The results in one short phrase for a policy step: why a sender is (not) proven."""
    if not isinstance(auth, Mapping):
        return "no Authentication-Results from a trusted server (email.trusted_authserv_ids)"
    at = _shown(auth.get("authserv_id")) or "?"
    dmarc = _result(auth, "dmarc")
    others = " ".join(f"{m}={_result(auth, m)}" for m in ("spf", "dkim"))
    if dmarc == "fail":
        return f"DMARC fail at {at} ({others})"
    if verified(auth):
        return f"authenticated at {at} ({others} dmarc={dmarc})"
    return f"no SPF, DKIM or DMARC pass at {at} ({others} dmarc={dmarc})"


def failed_verstat(meta: Mapping[str, Any]) -> str | None:
    """The StirVerstat value when the carrier says the caller ID failed verification."""
    value = meta.get("stir_verstat")
    if isinstance(value, str) and value.strip().lower().startswith(VERSTAT_FAILED):
        return _shown(value.strip())
    return None


def _result(auth: Mapping[str, Any], method: str) -> str:
    value = auth.get(method)
    return _shown(value).lower() if isinstance(value, str) and value else "none"


def _shown(value: object) -> str:
    text = value if isinstance(value, str) else ""
    return "".join(c for c in text[:_SHOWN] if c.isprintable())
