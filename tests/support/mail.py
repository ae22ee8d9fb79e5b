"""Mail servers for tests and benchmarks: a real Dovecot on a loopback port with a
throwaway maildir, and an aiosmtpd handler that records what it receives; mail to put in
them. The ``dovecot`` and ``dovecot_tls`` fixtures are here, for tests/email/conftest.py
(which has the other email fixtures) and test_lifecycle.py alike."""

import asyncio
import contextlib
import imaplib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SmtpServer
from aiosmtpd.smtp import Envelope, Session

from tests.support.net import free_port

DOVECOT = shutil.which("dovecot") or "/usr/sbin/dovecot"
USER = "support@example.com"
PASSWORD = "s3cret-test"


def _config(root: Path, port: int, *, tls: bool) -> str:
    ssl = (
        f"ssl = yes\nssl_cert = <{root}/cert.pem\nssl_key = <{root}/key.pem\n"
        if tls
        else "ssl = no\n"
    )
    return f"""
protocols = imap
listen = 127.0.0.1
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
info_log_path = {root}/dovecot.log
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
login_trusted_networks = 127.0.0.0/8
mail_location = maildir:{root}/mail/%u
mail_uid = nobody
mail_gid = nogroup
first_valid_uid = 1
default_login_user = dovenull
default_internal_user = dovecot
imap_idle_notify_interval = 1 secs
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={root}/home/%u
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
service stats {{
  chroot =
}}
"""


@dataclass
class Dovecot:
    """One Dovecot process; ``stop()``/``start()`` take it down and bring it back on the
    same port and maildir, for reconnect tests. ``stop()`` ends the whole process group,
    its IMAP sessions included, as ``systemctl stop dovecot`` does: the master alone
    leaves each session's ``imap`` process serving its client."""

    root: Path
    port: int
    tls: bool = False
    process: subprocess.Popen[bytes] | None = None
    conf: Path = field(init=False)

    def __post_init__(self) -> None:
        self.conf = self.root / "dovecot.conf"
        for sub in ("run", "state", "mail", "home"):
            (self.root / sub).mkdir(exist_ok=True)
        (self.root / "passwd").write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n")
        if self.tls:
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                 "-keyout", str(self.root / "key.pem"), "-out", str(self.root / "cert.pem")],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
        self.conf.write_text(_config(self.root, self.port, tls=self.tls))
        for sub in ("mail", "home"):
            shutil.chown(self.root / sub, "nobody", "nogroup")

    @property
    def cert(self) -> Path:
        return self.root / "cert.pem"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [DOVECOT, "-c", str(self.conf), "-F"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a process group of its own, for stop()
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"dovecot exited: {err} {self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError("dovecot did not listen in 15 s: " + self.log())

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    # --- test-side mailbox access with the stdlib client (a webmail user, an MTA) -----

    def imap(self) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        client.login(USER, PASSWORD)
        return client

    def append(self, raw: bytes, folder: str = "INBOX", flags: str = "") -> None:
        client = self.imap()
        try:
            if folder != "INBOX":
                client.create(folder)  # fails harmlessly when it exists
            typ, data = client.append(folder, f"({flags})" if flags else None, None, raw)
            assert typ == "OK", data
        finally:
            client.logout()

    def flags(self, folder: str = "INBOX") -> dict[int, str]:
        """UID -> FLAGS text of every message in a folder."""
        client = self.imap()
        try:
            client.select(folder, readonly=True)
            typ, data = client.uid("FETCH", "1:*", "(UID FLAGS)")
            out: dict[int, str] = {}
            for item in data:
                if not isinstance(item, bytes):
                    continue
                text = item.decode()
                if "UID " not in text:  # a flag change by another session, sent unasked
                    continue
                uid = int(text.split("UID ")[1].split()[0].rstrip(")"))
                out[uid] = text.split("FLAGS (")[1].split(")")[0]
            return out
        finally:
            client.logout()

    def run(self, *commands: tuple[str, ...], folder: str = "INBOX") -> None:
        """Run raw commands on a selected folder (mark read, delete, recreate)."""
        client = self.imap()
        try:
            client.select(folder)
            for name, *args in commands:
                typ, data = getattr(client, name)(*args)
                assert typ == "OK", (name, data)
        finally:
            client.logout()


def make_mail(
    message_id: str | None,
    *,
    sender: str = "Ayşe Yılmaz <ayse@customer.example>",
    subject: str = "Faturam hakkında",
    text: str = "Merhaba, faturamda bir sorun var.",
    **headers: str,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = USER
    msg["Subject"] = subject
    if message_id:
        msg["Message-ID"] = f"<{message_id}>"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content(text)
    return msg.as_bytes()


def mailbox_toml(port: int, **settings: object) -> str:
    """A daemon config's ``[[email.mailboxes]]`` entry "support" on the test Dovecot at
    ``port``, plain IMAP, with further mailbox settings (numbers and strings)."""
    lines = [
        "[[email.mailboxes]]",
        'name = "support"',
        'host = "127.0.0.1"',
        f"port = {port}",
        'security = "none"',
        f'username = "{USER}"',
        f'password = "{PASSWORD}"',
    ]
    lines += [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in settings.items()]
    return "\n" + "\n".join(lines) + "\n"


_SENDERS = ("ayse@acme.test", "it@globex.test", "stranger@nowhere.test")


def fill_maildir(server: Dovecot, n: int, prefix: str = "kill") -> list[str]:
    """Deliver ``n`` mails straight into the user's maildir ``new/`` (as a local delivery
    agent would) before the daemon starts: far faster than 2,000 IMAP APPENDs."""
    home = server.root / "mail" / USER
    for sub in ("cur", "new", "tmp"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    stamp = int(time.time())
    for i in range(n):
        message_id = f"{prefix}-{i:05d}@customer.example"
        raw = make_mail(
            message_id,
            sender=_SENDERS[i % len(_SENDERS)],
            subject=f"Sipariş {i}",
            text=f"Mail {i}: " + "x" * 400,
        )
        (home / "new" / f"{stamp}.M{i}P{os.getpid()}.omniroute-test").write_bytes(raw)
        ids.append(message_id)
    for path in (server.root / "mail", home, *home.iterdir()):
        shutil.chown(path, "nobody", "nogroup")
    for path in (home / "new").iterdir():
        shutil.chown(path, "nobody", "nogroup")
    return ids


def start_dovecot(tls: bool) -> Iterator[Dovecot]:
    """A Dovecot of its own on a free loopback port (with STARTTLS and a self-signed
    certificate when ``tls``), stopped and removed after."""
    root = Path(tempfile.mkdtemp(prefix="omniroute-dovecot-"))
    # dovecot's unprivileged processes must reach the maildir below this directory
    os.chmod(root, 0o755)  # noqa: S103
    server = Dovecot(root=root, port=free_port(), tls=tls)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    """A Dovecot of this test's own (plain IMAP, no STARTTLS offered) on a loopback port."""
    yield from start_dovecot(tls=False)


@pytest.fixture
def dovecot_tls() -> Iterator[Dovecot]:
    """A Dovecot offering STARTTLS with a self-signed certificate (``server.cert``)."""
    yield from start_dovecot(tls=True)


class Recorder:
    """An aiosmtpd handler that keeps every message it accepts; it refuses recipients named
    ``refuse...`` (550) and defers those named ``later...`` (451)."""

    def __init__(self) -> None:
        self.messages: list[Envelope] = []

    async def handle_RCPT(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SmtpServer, session: Session, envelope: Envelope, address: str,
        rcpt_options: list[str],
    ) -> str:  # fmt: skip
        if address.startswith("refuse"):
            return "550 5.1.1 no such user"
        if address.startswith("later"):
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SmtpServer, session: Session, envelope: Envelope
    ) -> str:
        self.messages.append(envelope)
        return "250 Message accepted for delivery"


@dataclass
class SmtpSink:
    host: str
    port: int
    recorder: Recorder


@contextlib.asynccontextmanager
async def serving_smtp(
    recorder: Recorder, controller: type[Controller] = Controller
) -> AsyncIterator[SmtpSink]:
    """An aiosmtpd server on a loopback port with ``recorder`` as its handler, for the block;
    ``controller``: a subclass that serves another ``SMTP`` class (e.g. one that records
    the wire's commands)."""
    server = controller(recorder, hostname="127.0.0.1", port=free_port())
    await asyncio.to_thread(server.start)
    try:
        yield SmtpSink("127.0.0.1", server.port, recorder)
    finally:
        await asyncio.to_thread(server.stop)
