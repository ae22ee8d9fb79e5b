"""Running the real daemon as a subprocess, as systemd or an operator would."""

import concurrent.futures
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


class DaemonProcess:
    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.config = config
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "config.cli", "--config", str(self.config), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def cli_all(
        self, *commands: Sequence[str], timeout: float = 60
    ) -> list[subprocess.CompletedProcess[str]]:
        """``cli`` for each of ``commands`` at once, their results in order: for commands that
        only read (explain, show, export, search), each still a real ``omniroute`` process,
        whose start (about a second of imports) runs beside the others on a second core."""
        with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
            return list(pool.map(lambda args: self.cli(*args, timeout=timeout), commands))

    def start(
        self, *components: str, log: Path | None = None, address_space: int | None = None
    ) -> "subprocess.Popen[bytes]":
        """``omniroute run``; with ``address_space``, under that RLIMIT_AS, so a memory
        regression fails the test instead of exhausting the machine."""
        args = [sys.executable, "-m", "config.cli", "--config", str(self.config), "run"]
        for component in components:
            args += ["--component", component]
        log = log or self.config.parent / "daemon.log"
        with log.open("ab") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                args,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=None if address_space is None else _limit_as(address_space),  # noqa: PLW1509 -- setrlimit only, before exec
            )
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)


def _limit_as(size: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (size, size))

    return apply


def write_config(path: Path, amqp_url: str, database_url: str, **extra: str) -> Path:
    lines = [
        f'amqp_url = "{amqp_url}"',
        f'database_url = "{database_url}"',
        f'state_dir = "{path.parent / "state"}"',
        "shutdown_timeout = 20",
        "[routing]",
        'default_region = "TR"',
        "[http]",
        'host = "127.0.0.1"',
        f"port = {extra.get('port', '0')}",
        "[log]",
        'format = "json"',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def daemon(tmp_path: Path, amqp_url: str, sqlite_url: str) -> Iterator[DaemonProcess]:
    config = write_config(tmp_path / "omniroute.toml", amqp_url, sqlite_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIROUTE_")}
    env["PYTHONPATH"] = str(ROOT)
    d = DaemonProcess(config, env)
    yield d
    d.stop_all()
