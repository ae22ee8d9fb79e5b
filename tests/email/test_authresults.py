"""Reading Authentication-Results (RFC 8601) as real servers write them, believing only the
trusted ones, and the rule that decides whether a sender is proven (issue 13)."""

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.email.authresults import MAX_LENGTH, MAX_VALUES, parse, read_auth, verified
from ingest.sender_auth import describe, failed_verstat

GMAIL_PASS = (
    "mx.google.com;\r\n"
    "       dkim=pass header.i=@acme.test header.s=20230601 header.b=AbCdEf12;\r\n"
    "       spf=pass (google.com: domain of ops@acme.test designates 203.0.113.5 as permitted "
    "sender) smtp.mailfrom=ops@acme.test;\r\n"
    "       dmarc=pass (p=NONE sp=NONE dis=NONE) header.from=acme.test"
)
GMAIL_SPOOF = (
    "mx.google.com;\r\n"
    "       spf=pass (google.com: domain of x@evil.example designates 198.51.100.9 as permitted "
    "sender) smtp.mailfrom=x@evil.example;\r\n"
    "       dmarc=fail (p=QUARANTINE sp=QUARANTINE dis=QUARANTINE) header.from=acme.test"
)
MICROSOFT = (
    "spf=fail (sender IP is 198.51.100.9) smtp.mailfrom=evil.example; dkim=none (message not "
    "signed) header.d=none;dmarc=fail action=none header.from=acme.test;compauth=fail reason=001"
)
OPENDKIM = (
    "mail.support.test;\n\tdkim=pass (2048-bit key; unprotected) header.d=acme.test "
    'header.i=@acme.test header.a=rsa-sha256 header.s=mail header.b="Zx9Qk1Lm"'
)
OPENDMARC = "mail.support.test; dmarc=pass (p=reject dis=none) header.from=acme.test"
POLICYD_SPF = (
    "mail.support.test; spf=softfail (domain owner discourages use of this host) "
    "smtp.mailfrom=acme.test (client-ip=198.51.100.9; helo=mail.evil.example; "
    "envelope-from=ops@acme.test; receiver=<UNKNOWN>)"
)
VERSIONED = "mail.support.test 1; dkim=fail header.d=acme.test; spf=pass smtp.mailfrom=acme.test"
RSPAMD = (
    "mx.support.test;\n\tdkim=pass header.d=acme.test header.s=dkim header.b=abc;\n"
    "\tdmarc=pass (policy=reject) header.from=acme.test;\n\tspf=pass (mx.support.test: domain of "
    '"ops@acme.test" designates 203.0.113.5 as permitted sender) smtp.mailfrom=ops@acme.test'
)


def auth(
    spf: str = "none", dkim: str = "none", dmarc: str = "none", at: str = "mx"
) -> dict[str, str]:
    return {"spf": spf, "dkim": dkim, "dmarc": dmarc, "authserv_id": at}


@pytest.mark.parametrize(
    ("values", "trusted", "expected"),
    [
        pytest.param(
            [GMAIL_PASS],
            ["mx.google.com"],
            auth("pass", "pass", "pass", "mx.google.com"),
            id="gmail, all pass",
        ),
        pytest.param(
            [GMAIL_SPOOF],
            ["MX.Google.COM"],
            auth("pass", "none", "fail", "mx.google.com"),
            id="gmail spoof; trusted ids compare case-insensitively",
        ),
        pytest.param(
            [RSPAMD],
            ["mx.support.test"],
            auth("pass", "pass", "pass", "mx.support.test"),
            id="rspamd; a quote inside a comment",
        ),
        pytest.param(
            [VERSIONED],
            ["mail.support.test"],
            auth("pass", "fail", "none", "mail.support.test"),
            id="version number after the authserv-id",
        ),
        pytest.param(
            [OPENDMARC, OPENDKIM, POLICYD_SPF],
            ["mail.support.test"],
            auth("softfail", "pass", "pass", "mail.support.test"),
            id="postfix milters each write one header with the same id",
        ),
        pytest.param(
            ["mail.support.test; none"],
            ["mail.support.test"],
            auth(at="mail.support.test"),
            id="none: no results",
        ),
        pytest.param(
            ["mail.support.test 2; dmarc=pass"],
            ["mail.support.test"],
            auth(at="mail.support.test"),
            id="an unknown version is not read",
        ),
        pytest.param(
            ["mx; dkim=fail header.d=a.test; dkim=pass header.d=acme.test"],
            ["mx"],
            auth(dkim="pass"),
            id="any passing dkim signature counts",
        ),
        pytest.param(
            ["mx; spf=HardFail smtp.mailfrom=acme.test"],
            ["mx"],
            auth(spf="fail"),
            id="legacy hardfail is fail",
        ),
        pytest.param(
            ["mx; dkim/1 = pass header.d=acme.test"],
            ["mx"],
            auth(dkim="pass"),
            id="method version and spaces around =",
        ),
        pytest.param(['"mx" ; dmarc=pass'], ["mx"], auth(dmarc="pass"), id="quoted authserv-id"),
    ],
)
def test_trusted_results_as_real_servers_write_them(
    values: list[str], trusted: list[str], expected: dict[str, str]
) -> None:
    """Gmail, rspamd and Postfix milter shapes give the server's own verdicts."""
    assert read_auth(values, trusted) == expected


def test_a_header_from_an_untrusted_server_is_never_believed() -> None:
    """Anyone can write an Authentication-Results header: only the configured ids count."""
    forged = "mx.support.test; dmarc=pass header.from=acme.test"
    assert read_auth([forged], ["mail.support.test"]) is None
    assert read_auth([forged], []) is None
    assert read_auth([forged], ["", "  "]) is None
    ours = "mail.support.test; dmarc=fail header.from=acme.test"
    assert read_auth([forged, ours], ["mail.support.test"]) == auth(
        dmarc="fail", at="mail.support.test"
    )


def test_the_topmost_trusted_server_speaks_for_the_mail() -> None:
    """Our own server is on top; a trusted server further down the path is not asked."""
    ours = "mail.support.test; dmarc=fail header.from=acme.test"
    gateway = "gw.support.test; dmarc=pass header.from=acme.test; spf=pass"
    trusted = ["gw.support.test", "mail.support.test"]
    assert read_auth([ours, gateway], trusted) == auth(dmarc="fail", at="mail.support.test")


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(MICROSOFT, id="microsoft 365 writes no authserv-id"),
        pytest.param("i=1; mail.support.test; dmarc=pass", id="ARC's instance tag form"),
        pytest.param("", id="empty"),
    ],
)
def test_a_header_naming_no_server_is_never_trusted(value: str) -> None:
    """Without an authserv-id nothing says whose verdict it is."""
    assert read_auth([value], ["mail.support.test", "outlook.com"]) is None


def test_microsoft_shape_parses_without_an_authserv_id() -> None:
    """Its results are read (for the record) though no server is named."""
    authserv_id, results = parse(MICROSOFT)
    assert authserv_id is None
    assert results == [("spf", "fail"), ("dkim", "none"), ("dmarc", "fail"), ("compauth", "fail")]


def test_semicolons_inside_comments_and_quotes_do_not_split_results() -> None:
    """A comment or a quoted property must not smuggle a result in."""
    value = (
        'mx; dkim=fail (key (nested; dmarc=pass) \\) x; dmarc=pass) header.b="a;dmarc=pass"; '
        "spf=neutral"
    )
    assert parse(value) == ("mx", [("dkim", "fail"), ("spf", "neutral")])
    assert read_auth([value], ["mx"]) == auth(spf="neutral", dkim="fail")


def test_reading_is_bounded() -> None:
    """A flood of headers, or one huge header, is read only as far as the caps."""
    flood = ["evil.example; dmarc=pass"] * MAX_VALUES + ["mx; dmarc=pass"]
    assert read_auth(flood, ["mx"]) is None
    padded = "mx; " + "x" * MAX_LENGTH + "; dmarc=pass"
    assert read_auth([padded], ["mx"]) == auth()
    hostile = ["mx; " + "(" * 200_000 + ";" * 200_000, '"' * 400_000, "\\" * 400_000]
    started = time.perf_counter()
    assert read_auth(hostile * 1000, ["mx"]) == auth()
    assert time.perf_counter() - started < 2.0


def test_wrong_types_read_as_nothing() -> None:
    """A caller's mistake is no exception: a lone string is one header, junk is skipped."""
    assert read_auth("mx; dmarc=pass", "mx") == auth(dmarc="pass")  # type: ignore[arg-type]
    assert read_auth([None, 7, "mx; dmarc=pass"], ["mx"]) == auth(dmarc="pass")  # type: ignore[list-item]
    assert read_auth(None, ["mx"]) is None  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.text(
            alphabet=st.sampled_from(list('mx;=() "\\\r\n\tdkimspfarcpasfil1/.@')), max_size=80
        ),
        max_size=5,
    )
)
def test_any_text_gives_a_wellformed_answer(values: list[str]) -> None:
    """Whatever a stranger writes, the answer is None or the four keys, never an error."""
    found = read_auth(values, ["mx"])
    if found is not None:
        assert set(found) == {"spf", "dkim", "dmarc", "authserv_id"}
        assert all(found[m].isascii() and found[m] == found[m].lower() for m in found)


@pytest.mark.parametrize(
    ("given_auth", "expected"),
    [
        (None, False),
        ({}, False),
        (auth(), False),
        (auth(dmarc="pass"), True),
        (auth(dmarc="PASS"), True),
        (auth("pass", "pass", "fail"), False),
        (auth(spf="pass"), True),
        (auth(dkim="pass"), True),
        (auth("pass", dmarc="temperror"), True),
        (auth("softfail", "neutral", "none"), False),
        (auth("fail", "fail", "bestguesspass"), False),
        ("pass", False),
        ({"dmarc": ["pass"]}, False),
    ],
)
def test_verified_rule(given_auth: object, expected: bool) -> None:
    """Proven: DMARC pass, or no DMARC fail and an SPF or DKIM pass; nothing else."""
    assert verified(given_auth) is expected  # type: ignore[arg-type]


def test_describe_says_why() -> None:
    """The step text names the server and the results."""
    assert describe(auth("fail", "none", "fail", "mx.example")) == (
        "DMARC fail at mx.example (spf=fail dkim=none)"
    )
    assert describe(None).startswith("no Authentication-Results from a trusted server")
    assert describe(auth("softfail", at="mx")) == (
        "no SPF, DKIM or DMARC pass at mx (spf=softfail dkim=none dmarc=none)"
    )
    hostile = describe({"dmarc": "fail\x1b[31m", "authserv_id": "m\nx"})
    assert hostile.isprintable()
    assert len(describe({"dmarc": "x" * 5000, "authserv_id": "y" * 5000})) < 200


@pytest.mark.parametrize(
    ("value", "failed"),
    [
        ("TN-Validation-Failed-A", True),
        ("TN-Validation-Failed-C", True),
        ("tn-validation-failed", True),
        ("TN-Validation-Passed-A", False),
        ("No-TN-Validation", False),
        ("", False),
        (None, False),
    ],
)
def test_failed_verstat(value: str | None, failed: bool) -> None:
    """Only a checked-and-failed caller ID counts; an unsigned call is not a failure."""
    assert (failed_verstat({"stir_verstat": value}) is not None) is failed
