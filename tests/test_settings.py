"""Settings: TOML, environment and secret files combine as documented, and the
configuration reference in docs/ is the one the code generates."""

import subprocess
import sys
from pathlib import Path

import pytest

from config.settings import load_settings
from ingest.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_environment_overrides_toml_and_secret_files_fill_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Operators keep secrets out of the TOML file: systemd hands them over as files."""
    toml = tmp_path / "omniroute.toml"
    toml.write_text(
        '[routing]\ndefault_region = "TR"\ndefault_team = "billing"\n'
        '[[email.mailboxes]]\nname = "support"\nhost = "127.0.0.1"\nsecurity = "none"\n'
        'username = "support@example.com"\n',
        encoding="utf-8",
    )
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "twilio.auth_token").write_text("tw-secret\n", encoding="utf-8")
    (creds / "mailbox.support.password").write_text("imap-secret", encoding="utf-8")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("OMNIROUTE_ROUTING__DEFAULT_TEAM", "network")
    settings = load_settings(toml)
    assert settings.routing.default_region == "TR"
    assert settings.routing.default_team == "network"
    assert settings.twilio.auth_token is not None
    assert settings.twilio.auth_token.get_secret_value() == "tw-secret"
    password = settings.email.mailboxes[0].password
    assert password is not None
    assert password.get_secret_value() == "imap-secret"
    assert "tw-secret" not in repr(settings)


def test_errors_name_the_key(tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text('[http]\nport = "eighty"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"http\.port"):
        load_settings(toml)
    toml.write_text("[routing\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(toml)
    toml.write_text(
        '[[email.mailboxes]]\nname = "x"\nhost = "imap.example.com"\nsecurity = "none"\n'
        'username = "u"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match="loopback"):
        load_settings(toml)


@pytest.mark.parametrize(
    ("toml_text", "required"),
    [
        ("", False),
        ('[email]\ntrusted_authserv_ids = ["mx.support.test"]\n', True),
        (
            '[email]\ntrusted_authserv_ids = ["mx.support.test"]\n'
            "[routing]\nrequire_authenticated_email = false\n",
            False,
        ),
        ("[routing]\nrequire_authenticated_email = true\n", True),
    ],
)
def test_require_authenticated_email_follows_the_trusted_servers(
    tmp_path: Path, toml_text: str, required: bool
) -> None:
    """Naming the servers whose verdicts are believed turns the check on, unless the
    operator says otherwise; the router always gets a plain bool."""
    toml = tmp_path / "omniroute.toml"
    toml.write_text(toml_text, encoding="utf-8")
    assert load_settings(toml).routing.require_authenticated_email is required


def test_an_authserv_id_no_header_can_carry_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "omniroute.toml"
    toml.write_text('[email]\ntrusted_authserv_ids = ["mx.example; dmarc=pass"]\n')
    with pytest.raises(ConfigError, match=r"email\.trusted_authserv_ids"):
        load_settings(toml)


def test_example_configuration_loads() -> None:
    settings = load_settings(ROOT / "config" / "examples" / "omniroute.toml")
    assert settings.routing.default_region == "TR"


def test_configuration_reference_is_up_to_date() -> None:
    """docs/CONFIGURATION.md is generated; a settings change must regenerate it."""
    result = subprocess.run(
        [sys.executable, "scripts/config_reference.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        check=False,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, "run: python scripts/config_reference.py"
