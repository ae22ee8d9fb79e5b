"""`omniroute rules test` and `route explain` with topic rules (issue 20), on the example
directory: an operator replays messages through a rule set before it goes live, and an
expectation that fails says so with exit 1; a rule naming a team the directory lacks, or
a line that is not a message, is one line and exit 2."""

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from config.cli import main
from ingest.schema import Identity, InboundMessage, Route, RoutedMessage
from tests.support import directory
from tests.support.logs import restored_logging  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("restored_logging")

MONDAY_NOON = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)  # 12:00 in Istanbul
RULES = """
[[rules]]
name = "network"
keywords = ["sunucu", "server", "kesinti"]
team = "network"

[[rules]]
name = "urgent"
keywords = ["acil", "urgent"]
tag = "urgent"

[[rules]]
name = "iptal"
keywords = ["iptal"]
team = "enterprise"
override_owner = true

[[samples]]
message = "<kesinti@example.com>"
expect = "team.network"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "omniroute.toml"
    path.write_text(
        f'database_url = "sqlite:///{tmp_path / "directory.db"}"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        '[routing]\ndefault_region = "TR"\ndefault_team = "billing"\n'
        'timezone = "Europe/Istanbul"\n',
        encoding="utf-8",
    )
    directory.load_examples(path, ("teams", "agents", "customers"))
    return path


def mail(external_id: str, sender: str, subject: str) -> InboundMessage:
    return InboundMessage(
        channel="email",
        external_id=external_id,
        sender=Identity(kind="email", address=sender),
        subject=subject,
        received_at=MONDAY_NOON,  # decided as of then: billing is open
    )


def rules_test(config: Path, rules: Path, messages: Path) -> int:
    return main(["--config", str(config), "rules", "test", str(rules), "--messages", str(messages)])


def samples(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "sample.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_rules_test_replays_and_fails_on_an_unmet_expectation(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Per message the route and the rule; a summary; exit 1 as one expectation fails."""
    rules = tmp_path / "candidate.toml"
    rules.write_text(RULES, encoding="utf-8")
    stranger = mail("<kesinti@example.com>", "someone@nowhere.test", "ACİL: Sunucum çöktü")
    kemal = mail("<kemal@example.com>", "kemal.ozturk@example.com.tr", "Sunucu kesintisi")
    iptal = mail("<iptal@example.com>", "kemal.ozturk@example.com.tr", "Aboneliğimi İPTAL edin")
    was = Route(kind="team", target="billing", reason="dedicated_team")
    routed = RoutedMessage(message=iptal, route=was)
    lines = [
        stranger.model_dump_json(),
        json.dumps({**json.loads(kemal.model_dump_json()), "expect": "team.network"}),
        routed.model_dump_json(),  # as `omniroute tail --json` prints it
    ]
    code = rules_test(config, rules, samples(tmp_path, lines))
    out = capsys.readouterr().out
    assert code == 1, out
    first, second, third = out.splitlines()[:3]
    assert "team.network" in first
    assert "rule=network  tags=urgent  ok" in first
    assert "team.billing" in second
    assert "dedicated_team" in second
    assert "FAIL (expected team.network)" in second  # Kemal stays with his own team
    assert "team.enterprise" in third
    assert "rule=iptal  (live: team.billing)" in third
    assert "3 messages, 3 rules" in out
    assert "expectations: 1 of 2 met" in out

    lines[1] = kemal.model_dump_json()  # no expectation left that fails
    ok = rules_test(config, rules, samples(tmp_path, lines))
    assert ok == 0
    assert "expectations: 1 of 1 met" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("rules", "lines", "error"),
    [
        (
            '[[rules]]\nname = "x"\nteam = "nosuch"\n',
            [],
            "rule 'x' names team 'nosuch', which is not in the directory",
        ),
        ('[[rules]]\nname = "x"\nkeywords = []\nteam = "billing"\n', [], "keywords: empty"),
        ('[[rules]]\nname = "x"\nteam = "billing"\n', ['{"channel": "fax"}'], "1: not a message"),
    ],
)
def test_rules_test_refuses_in_one_line(
    config: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rules: str,
    lines: list[str],
    error: str,
) -> None:
    path = tmp_path / "candidate.toml"
    path.write_text(rules, encoding="utf-8")
    code = rules_test(config, path, samples(tmp_path, lines))
    err = capsys.readouterr().err
    assert code == 2
    assert error in err
    assert err.count("\n") == 1, err


def test_route_explain_shows_each_rule_and_why(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every rule considered, its place in the chain, and why it did or did not match."""
    text = (
        config.read_text(encoding="utf-8")
        + "".join(f"[[routing.rules]]\n{block}\n" for block in RULES.split("[[rules]]")[1:]).split(
            "[[samples]]"
        )[0]
    )
    config.write_text(text, encoding="utf-8")
    # a Wednesday morning in Istanbul: within the team's hours whenever the suite runs
    args = ["--config", str(config), "route", "explain", "--channel", "email"]
    args += ["--at", "2026-12-09T10:00+03:00"]
    code = main([*args, "--from", "someone@nowhere.test", "--subject", "Sunucu çöktü"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (
        "  urgent               topic_override  no match    none of acil, urgent begins a word"
        in out
    )
    assert "  iptal                topic_override  no match    none of iptal begins a word" in out
    assert "  network              topic           decided     every condition holds" in out
    assert "topic: rule network matches: team.network" in out
    assert "route:     team.network" in out
    assert "reason:    topic" in out
    assert "rule:      network; tags: -" in out


def test_check_names_a_rule_whose_team_the_directory_lacks(config: Path) -> None:
    """`omniroute check`'s rules row: the directory is where the teams are."""
    from config.check import _check_rules
    from config.settings import load_settings

    config.write_text(
        config.read_text(encoding="utf-8")
        + '[[routing.rules]]\nname = "x"\nkeywords = "fatura"\nteam = "nosuch"\n'
        + '[[routing.rules]]\nname = "y"\nkeywords = "sunucu"\nteam = "network"\n',
        encoding="utf-8",
    )
    name, ok, why = asyncio.run(_check_rules(load_settings(config)))
    assert (name, ok) == ("rules", False)
    assert why == "routing.rules: rule 'x' names team 'nosuch', which is not in the directory"
