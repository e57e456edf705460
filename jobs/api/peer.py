"""Which local account a loopback connection comes from (Linux): without a token, the API
answers only the account that runs it, not every account that can reach 127.0.0.1.

The kernel's sock_diag netlink interface looks up the client's own socket by its four
addresses and says whose it is, in one round trip and without privileges (what `ss -e`
shows as `uid:`). Our own few lines over the standard library's netlink socket rather
than pyroute2: this one question needs two structs, not a netlink framework.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys

AVAILABLE = sys.platform == "linux"

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLMSG_ERROR = 0x2
NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid: sport,
# dport (network order), src, dst (16 bytes each), interface, cookie (2 x u32).
REQUEST = struct.Struct("=BBBBI")
SOCKID = struct.Struct("!HH16s16s")
SOCKID_REST = struct.Struct("=III")
NO_COOKIE = 0xFFFFFFFF
ALL_STATES = 0xFFFFFFFF
# inet_diag_msg: family, state, timer, retrans, sockid (48 bytes), then expires, rqueue,
# wqueue, uid, inode.
REPLY = struct.Struct("=BBBB48sIIIII")


class PeerLookup:
    """One netlink socket for a process's lookups; used from the event loop's thread."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0

    def uid_of(self, client: tuple[str, int], server: tuple[str, int]) -> int | None:
        """The uid owning the local TCP socket that has `client` as its own address and
        `server` as its peer's; None if there is none here (not Linux, a connection from
        another network namespace, a socket closed meanwhile)."""
        if not AVAILABLE:
            return None
        try:
            family, src, dst = _addresses(client[0], server[0])
        except ValueError:
            return None
        request = REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, ALL_STATES)
        request += SOCKID.pack(client[1], server[1], src, dst)
        request += SOCKID_REST.pack(0, NO_COOKIE, NO_COOKIE)
        try:
            return self._ask(request)
        except OSError:
            self.close()  # a fresh socket next time
            return None

    def _ask(self, request: bytes) -> int | None:
        if sys.platform != "linux":
            return None  # never called there; tells the type checker
        if self._sock is None:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
            self._sock.settimeout(1.0)  # the kernel answers at once; never hang a request
        self._seq += 1
        header = NLMSG_HEADER.pack(NLMSG_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY,
                                   NLM_F_REQUEST, self._seq, 0)
        self._sock.send(header + request)
        while True:
            data = self._sock.recv(8192)
            length, kind, _, seq, _ = NLMSG_HEADER.unpack_from(data)
            if seq != self._seq:
                continue  # the late answer to an earlier question that timed out
            if kind == NLMSG_ERROR or length < NLMSG_HEADER.size + REPLY.size:
                return None  # no such socket (ENOENT)
            fields = REPLY.unpack_from(data, NLMSG_HEADER.size)
            return int(fields[8])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _addresses(client: str, server: str) -> tuple[int, bytes, bytes]:
    """The family and the two addresses as sock_diag wants them (16 bytes each)."""
    a, b = ipaddress.ip_address(client), ipaddress.ip_address(server)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped  # an IPv4 client of a dual-stack server: its socket is IPv4
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    if a.version != b.version:
        raise ValueError("mixed address families")
    family = socket.AF_INET if a.version == 4 else socket.AF_INET6
    return family, a.packed.ljust(16, b"\0"), b.packed.ljust(16, b"\0")


def this_account() -> int | None:
    return os.geteuid() if hasattr(os, "geteuid") else None
