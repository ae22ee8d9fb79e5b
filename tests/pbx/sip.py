"""A caller and a PBX in a few lines of SIP over loopback UDP (RFC 3261), for the tests
that put a real Kamailio between them: the caller resends its INVITE as a phone does, the
PBX records each Request-URI it gets and answers ``486 <user> busy``, so the caller hears
where its call was relayed."""

import asyncio
import secrets
import socket
from dataclasses import dataclass, field

LOCAL = "127.0.0.1"
T1 = 0.5  # RFC 3261 17.1.1.1: the first INVITE resend, doubling after


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOCAL, 0))
    sock.setblocking(False)
    return sock


def headers(message: str) -> dict[str, str]:
    """The first value of each header, by lower-case name (no compact forms needed here)."""
    found: dict[str, str] = {}
    for line in message.split("\r\n\r\n", 1)[0].split("\r\n")[1:]:
        name, _, value = line.partition(":")
        found.setdefault(name.strip().lower(), value.strip())
    return found


@dataclass
class Reply:
    status: int
    reason: str
    elapsed: float  # from the first INVITE to the final reply
    sent: int  # how many times the INVITE went out


class Phone:
    """A caller: sends an INVITE, resends it on RFC 3261's timer A until it hears anything,
    waits for the final reply and ACKs it (a non-2xx, hop by hop)."""

    def __init__(self) -> None:
        self.sock = udp_socket()
        self.port: int = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()

    async def options(self, port: int) -> bool:
        call_id = secrets.token_hex(8)
        await self._send(
            self._request("OPTIONS", port, "probe", call_id, secrets.token_hex(4)), port
        )
        try:
            async with asyncio.timeout(0.3):
                while True:
                    reply = await self._receive()
                    if headers(reply).get("call-id") == call_id:
                        return reply.startswith("SIP/2.0 200 ")
        except TimeoutError:
            return False

    async def invite(self, port: int, caller: str, call_id: str) -> Reply:
        loop = asyncio.get_running_loop()
        branch = "z9hG4bK" + secrets.token_hex(8)
        request = self._request("INVITE", port, caller, call_id, branch)
        started = loop.time()
        await self._send(request, port)
        sent, interval, heard = 1, T1, False
        resend_at = started + interval
        async with asyncio.timeout(10):
            while True:
                wait = None if heard else max(0.0, resend_at - loop.time())
                try:
                    async with asyncio.timeout(wait):
                        reply = await self._receive()
                except TimeoutError:  # nothing yet: resend (timer A doubles)
                    await self._send(request, port)
                    sent += 1
                    interval *= 2
                    resend_at += interval
                    continue
                if headers(reply).get("call-id") != call_id:
                    continue  # a late resend of an earlier call's reply
                heard = True
                status, reason = reply.split("\r\n", 1)[0].split(" ", 2)[1:]
                if int(status) >= 200:
                    await self._send(self._ack(request, reply), port)
                    return Reply(int(status), reason, loop.time() - started, sent)

    def _request(self, method: str, port: int, caller: str, call_id: str, branch: str) -> str:
        # "anonymous@anonymous.invalid" (RFC 3323's withheld caller) is given whole
        user_host = caller if "@" in caller else f"{caller}@carrier.example.test"
        return (
            f"{method} sip:2125550000@{LOCAL}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {LOCAL}:{self.port};branch={branch};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:{user_host}>;tag={secrets.token_hex(4)}\r\n"
            f"To: <sip:2125550000@{LOCAL}>\r\n"
            f"Call-ID: {call_id}\r\n"
            f"CSeq: 1 {method}\r\n"
            f"Contact: <sip:caller@{LOCAL}:{self.port}>\r\n"
            "Content-Length: 0\r\n\r\n"
        )

    @staticmethod
    def _ack(invite: str, reply: str) -> str:
        """RFC 3261 17.1.1.3: the ACK of a non-2xx final reply."""
        lines = invite.split("\r\n")
        first = lines[0].replace("INVITE ", "ACK ", 1)
        kept = [line for line in lines[1:] if line.split(":", 1)[0] in ("Via", "From", "Call-ID")]
        to = headers(reply)["to"]
        return (
            f"{first}\r\n" + "\r\n".join(kept) + f"\r\nTo: {to}\r\nCSeq: 1 ACK\r\n"
            "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        )

    async def _send(self, message: str, port: int) -> None:
        await asyncio.get_running_loop().sock_sendto(self.sock, message.encode(), (LOCAL, port))

    async def _receive(self) -> str:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 65535)
        return data.decode()


@dataclass
class Pbx:
    """The PBX behind Kamailio: records each INVITE's Request-URI by Call-ID and answers
    ``486 <user> busy``."""

    sock: socket.socket = field(default_factory=udp_socket)
    invites: dict[str, list[str]] = field(default_factory=dict)

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def uri(self, user: str) -> str:
        return f"sip:{user}@{LOCAL}:{self.port}"

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data, peer = await loop.sock_recvfrom(self.sock, 65535)
            request = data.decode()
            if not request.startswith("INVITE "):
                continue  # the ACK of our 486
            uri = request.split(" ", 2)[1]
            found = headers(request)
            self.invites.setdefault(found["call-id"], []).append(uri)
            user = uri.removeprefix("sip:").split("@", 1)[0]
            vias = [line for line in request.split("\r\n") if line.lower().startswith("via:")]
            reply = (
                f"SIP/2.0 486 {user} busy\r\n" + "\r\n".join(vias) + "\r\n"
                f"From: {found['from']}\r\nTo: {found['to']};tag=pbx\r\n"
                f"Call-ID: {found['call-id']}\r\nCSeq: {found['cseq']}\r\n"
                "Content-Length: 0\r\n\r\n"
            )
            await loop.sock_sendto(self.sock, reply.encode(), peer)
