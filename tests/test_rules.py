"""Topic rules (issue 20): the matcher and the validator, table-driven. Turkish adds suffixes
and has two i's, so a keyword matches at the start of a word in any case, never inside one;
a rule set that cannot work is refused at load with one line naming the problem."""

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from config.settings import load_settings
from ingest.errors import ConfigError
from ingest.schema import Identity, InboundMessage
from routers.directory import CustomerRecord
from routers.keywords import fold
from routers.rules import RuleSet, TopicRule

UTC_ZONE = ZoneInfo("UTC")
MONDAY_NOON = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
SUNDAY_NOON = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
HOSTING = CustomerRecord(id="c1", name="Acme", team_id="hosting", language="tr")
LONER = CustomerRecord(id="c2", name="No team", team_id=None, language="en-GB")


def mail(subject: str = "", text: str = "", *, channel: str = "email", to: str | None = None,
         **meta: Any) -> InboundMessage:  # fmt: skip
    kind = "email" if channel == "email" else "phone"
    return InboundMessage(
        channel=channel,  # type: ignore[arg-type]
        external_id="x",
        sender=Identity(kind=kind, address="a@example.com" if kind == "email" else "+905321112233"),  # type: ignore[arg-type]
        recipient=Identity(kind=kind, address=to) if to else None,  # type: ignore[arg-type]
        subject=subject,
        text=text,
        meta=meta,
    )


def rule(**keys: Any) -> TopicRule:
    keys.setdefault("name", "r")
    if not {"team", "triage", "tag"} & keys.keys():
        keys["team"] = "billing"
    return TopicRule.model_validate(keys)


def matches(r: TopicRule, message: InboundMessage, customer: CustomerRecord | None = None,
            now: datetime = MONDAY_NOON, zone: ZoneInfo = UTC_ZONE) -> bool:  # fmt: skip
    rules = RuleSet([r], "TR")
    return rules.match(message, customer, now, zone, early=r.early).rule is not None


KEYWORDS = [
    # keywords, subject, text, matches
    (["fatura"], "Faturamı ödeyemiyorum", "", True),
    (["fatura"], "FATURAMI ÖDEYEMİYORUM", "", True),
    (["fatura"], "", "faturası gelmedi", True),
    (["fatura"], "", "e-fatura", True),  # a hyphen separates words
    (["fatura"], "", "efatura", False),  # inside a word
    (["ayar"], "", "kayar", False),
    (["ayar"], "", "Ayarlar bozuldu", True),
    (["iade"], "İADE talebi", "", True),  # dotted capital I
    (["ıslak"], "ISLAK zemin", "", True),  # dotless
    (["invoice"], "INVOICE overdue", "", True),  # English capitals
    (["İptal"], "iptal etmek istiyorum", "", True),  # the keyword written in capitals
    (["iade talebi"], "", "İade   talebim var", True),  # a phrase, endings on each word
    (["iade talebi"], "", "talebi iade", False),
    (["sunucu", "server"], "", "Our server is down", True),  # any of
    (["sunucu"], "", "", False),
    (["fatura"], "", "x" * 25_000 + " fatura", False),  # past the scanned start
    (["5g"], "", "5G hattım", True),
]


@pytest.mark.parametrize(("keywords", "subject", "text", "expected"), KEYWORDS)
def test_keyword_table(keywords: list[str], subject: str, text: str, expected: bool) -> None:
    """Start of a word, any ending, any case (Turkish i's included), never inside a word."""
    assert matches(rule(keywords=keywords), mail(subject, text)) is expected


def test_folding_makes_the_four_is_one_letter() -> None:
    assert fold("İIıi") == "iiii"
    assert fold("FATURAMI") == fold("faturamı")


CONDITIONS = [
    # rule keys, message, customer, now, matches
    ({"channel": "sms"}, mail(), None, MONDAY_NOON, False),
    ({"channel": ["sms", "email"]}, mail(), None, MONDAY_NOON, True),
    ({"to": "Destek@Example.com"}, mail(to="destek@example.com"), None, MONDAY_NOON, True),
    ({"to": "destek@example.com"}, mail(to="satis@example.com"), None, MONDAY_NOON, False),
    ({"to": "+902125550100"}, mail(channel="sms", to="0212 555 01 00"), None, MONDAY_NOON, True),
    ({"to": "+902125550100"}, mail(), None, MONDAY_NOON, False),  # no recipient
    ({"known": False}, mail(), None, MONDAY_NOON, True),
    ({"known": False}, mail(), LONER, MONDAY_NOON, False),
    ({"known": True}, mail(), LONER, MONDAY_NOON, True),
    ({"customer_team": "hosting", "override_owner": True}, mail(), HOSTING, MONDAY_NOON, True),
    ({"customer_team": "hosting", "override_owner": True}, mail(), LONER, MONDAY_NOON, False),
    ({"customer_team": "hosting", "override_owner": True}, mail(), None, MONDAY_NOON, False),
    ({"language": "tr"}, mail(), HOSTING, MONDAY_NOON, True),  # the directory's language
    ({"language": "en"}, mail(), LONER, MONDAY_NOON, True),  # en-GB
    ({"language": "en"}, mail(language="tr"), LONER, MONDAY_NOON, False),  # the message's wins
    ({"language": "tr"}, mail(), None, MONDAY_NOON, False),  # unknown language
    ({"hours": "Mon-Fri 09:00-18:00"}, mail(), None, MONDAY_NOON, True),
    ({"hours": "Mon-Fri 09:00-18:00"}, mail(), None, SUNDAY_NOON, False),
    ({"hours": "Sun 22:00-02:00"}, mail(), None, datetime(2026, 11, 23, 1, 0, tzinfo=UTC), True),
    # every condition together, then one of them failing
    (
        {
            "channel": "email",
            "known": False,
            "keywords": "fatura",
            "hours": "Mon 12:00-13:00",
            "to": "destek@example.com",
        },
        mail("Faturam", to="destek@example.com"),
        None,
        MONDAY_NOON,
        True,
    ),  # fmt: skip
    (
        {
            "channel": "email",
            "known": False,
            "keywords": "fatura",
            "hours": "Mon 12:00-13:00",
            "to": "destek@example.com",
        },
        mail("Kargom", to="destek@example.com"),
        None,
        MONDAY_NOON,
        False,
    ),  # fmt: skip
]


@pytest.mark.parametrize(("keys", "message", "customer", "now", "expected"), CONDITIONS)
def test_condition_table(
    keys: dict[str, Any],
    message: InboundMessage,
    customer: CustomerRecord | None,
    now: datetime,
    expected: bool,
) -> None:
    """Each condition alone, and all of them together: every one must hold."""
    assert matches(rule(**keys), message, customer, now) is expected


def test_hours_are_read_in_the_routing_timezone() -> None:
    """Mon 09:00-10:00 in Istanbul is 06:00-07:00 UTC."""
    r = rule(hours="Mon 09:00-10:00")
    at = datetime(2026, 11, 23, 6, 30, tzinfo=UTC)
    assert matches(r, mail(), now=at, zone=ZoneInfo("Europe/Istanbul"))
    assert not matches(r, mail(), now=at, zone=UTC_ZONE)


def test_first_rule_decides_and_tag_rules_only_tag() -> None:
    rules = RuleSet(
        [
            rule(name="vip", tag="vip", keywords="acil"),
            rule(name="fatura", keywords="fatura"),
            rule(name="any", triage=True, channel="email"),
        ],
        "TR",
    )
    early = rules.match(mail("ACİL: faturam"), None, MONDAY_NOON, UTC_ZONE, early=True)
    assert (early.rule, early.tags) == (None, ("vip",))
    late = rules.match(mail("ACİL: faturam"), None, MONDAY_NOON, UTC_ZONE, early=False)
    assert late.rule is not None
    assert late.rule.name == "fatura"
    assert late.said == "rule fatura matches: team.billing"


def test_explain_says_why_each_rule_did_not_match() -> None:
    rules = RuleSet([rule(name="sms", channel="sms"), rule(name="fatura", keywords="fatura")])
    said = rules.explain(mail("merhaba"), None, MONDAY_NOON, UTC_ZONE)
    assert [(r.name, miss, why) for r, miss, why in said] == [
        ("sms", "channel", "email is not sms"),
        ("fatura", "keywords", "none of fatura begins a word"),
    ]


REFUSED = [
    # the [[routing.rules]] tables, the one-line error
    ([{"name": "a", "keywords": [], "team": "billing"}], "routing.rules.0.keywords: empty"),
    ([{"name": "a", "hours": "Mon 9-17", "team": "billing"}],
     "routing.rules.0.hours: hours 'Mon 9-17': bad time"),
    ([{"name": "a", "team": "billing", "triage": True}], "give one action"),
    ([{"name": "a"}], "give one action"),
    ([{"name": "a", "team": "x"}, {"name": "a", "team": "y", "channel": "sms"}],
     "name 'a' is used twice"),
    (
        [{"name": "fatura", "keywords": ["fatura", "invoice"], "team": "billing"},
         {"name": "faturam", "keywords": "faturam", "channel": "sms", "team": "accounts"}],
        "rule 2 'faturam' can never match: rule 'fatura' before it takes every message it would",
    ),
    ([{"name": "a", "customer_team": "hosting", "team": "x"}], "set override_owner = true"),
    ([{"name": "a", "customer_team": "h", "known": False, "override_owner": True, "team": "x"}],
     "never matches: known = false with customer_team"),
    ([{"name": "a", "to": "02125550100", "team": "x"}], "write numbers in E.164"),
    ([{"name": "a b", "team": "x"}], "routing.rules.0.name: String should match pattern"),
    ([{"name": "a", "keywords": "!!", "team": "x"}], "keyword '!!' has no letter or digit"),
    ([{"name": "a", "team": "x", "colour": "red"}], "routing.rules.0.colour: unknown key"),
]  # fmt: skip


@pytest.mark.parametrize(("rules", "error"), REFUSED)
def test_validator_table(tmp_path: Path, rules: list[dict[str, Any]], error: str) -> None:
    """Each refusal at load is one line naming the key or the rule."""
    path = tmp_path / "omniroute.toml"
    path.write_text(_toml(rules), encoding="utf-8")
    with pytest.raises(ConfigError) as refused:
        load_settings(path)
    assert error in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_rule_narrower_in_another_place_is_not_shadowed(tmp_path: Path) -> None:
    """Same conditions, but one overrides the owner: both can match."""
    path = tmp_path / "omniroute.toml"
    path.write_text(
        _toml(
            [
                {"name": "a", "keywords": "fatura", "team": "billing"},
                {"name": "b", "keywords": "fatura", "team": "billing", "override_owner": True},
                {"name": "c", "keywords": "fatura", "tag": "money"},
            ]
        ),
        encoding="utf-8",
    )
    assert len(load_settings(path).routing.topics) == 3


def test_a_broken_shadow_file_is_refused_naming_the_key(tmp_path: Path) -> None:
    candidate = tmp_path / "candidate.toml"
    candidate.write_text('[[rules]]\nname = "a"\nkeywords = []\nteam = "x"\n', encoding="utf-8")
    path = tmp_path / "omniroute.toml"
    path.write_text(f'[routing]\nshadow_rules = "{candidate}"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"routing.shadow_rules: .*rules.0.keywords: empty"):
        load_settings(path)


def _toml(rules: list[dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v) + '"'

    return "".join(
        "[[routing.rules]]\n" + "".join(f"{k} = {value(v)}\n" for k, v in r.items()) for r in rules
    )


def test_the_shadow_decides_with_the_live_settings_as_resolved(tmp_path: Path) -> None:
    """Only the rules differ: require_authenticated_email, resolved after the routing
    settings were read (email.trusted_authserv_ids), holds for the candidate too, or every
    unproven sender would show as a difference."""
    candidate = tmp_path / "candidate.toml"
    candidate.write_text('[[rules]]\nname = "a"\nteam = "x"\n', encoding="utf-8")
    path = tmp_path / "omniroute.toml"
    path.write_text(
        f'[routing]\nshadow_rules = "{candidate}"\n[email]\ntrusted_authserv_ids = ["mx.test"]\n',
        encoding="utf-8",
    )
    routing = load_settings(path).routing
    assert routing.shadow is not None
    assert routing.shadow.require_authenticated_email is True
    assert [r.name for r in routing.shadow.topics.rules] == ["a"]
    assert routing.shadow.shadow is None
