"""systemd's notify protocol (sd_notify(3)): one datagram per state to ``$NOTIFY_SOCKET``.

Written out rather than pulled in as a dependency: it is one ``sendto`` on a Unix datagram
socket, with ``@`` meaning the abstract namespace. Without ``NOTIFY_SOCKET`` it does nothing.
"""

import contextlib
import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        raw = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + raw[1:] if raw.startswith("@") else raw
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *states: str) -> None:
        """Send ``READY=1``, ``STATUS=…``, ``WATCHDOG=1`` …; a full socket drops the state
        rather than block the event loop."""
        if self._socket is None:
            return
        with contextlib.suppress(BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            self._socket.sendto("\n".join(states).encode(), self._address)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval() -> float | None:
    """Half of ``WATCHDOG_USEC`` (systemd's advice), when this process is the one watched."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
