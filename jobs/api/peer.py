"""Which local account a loopback connection comes from (Linux): without a token, the API
answers only the account that runs it, not every account that can reach 127.0.0.1.

The kernel's sock_diag netlink interface looks up the client's own socket by its four
addresses and says whose it is, in one round trip and without privileges (what `ss -e`
shows as `uid:`). Our own few lines over the standard library's netlink socket rather
than pyroute2: this one question needs two structs, not a netlink framework.
"""

from __future__ import annotations

import errno
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
TCP_CLOSE, TCP_LISTEN = 7, 10
CONNECTED = frozenset({1, 8})  # ESTABLISHED, CLOSE_WAIT (its client sent all it will)


CLOSED = -1  # what `account` says of a connection whose client end is no process's any more
UNKNOWN = -2  # what it says when a lookup failed just now (out of descriptors): ask again
# A lookup that fails so may succeed a moment later: another account can cause these
# (by holding connections open), so they must never read as "cannot be told here".
# Its own test connection failing (ports all taken, as another account can make them)
# says nothing of the kernel either.
FOR_NOW = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EAGAIN,
                     errno.EINTR, errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.ECONNREFUSED,
                     errno.ECONNRESET})


class PeerLookup:
    """One netlink socket for a process's lookups; used from the event loop's thread."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._seq = 0
        self._works: bool | None = None  # whether this kernel looks up TCP sockets
        self._loopback = _loopback_index()

    def account(self, client: tuple[str, int], server: tuple[str, int]) -> int | None:
        """The uid of the process holding the local TCP socket that has `client` as its own
        address and `server` as its peer's; CLOSED if that connection was closed or reset
        (its client end is held by no process, or only our end was left, and it is gone
        too); None if it cannot be told here (not Linux; a connection from another network
        namespace, such as a port forwarded into a container: only our end is here);
        UNKNOWN if a lookup failed just now, so that the caller refuses this once."""
        if not AVAILABLE:
            return None
        if self._works is None:
            works = self._finds_its_own()
            if works is None:
                return UNKNOWN  # tried again with the next request
            self._works = works
        try:
            family, src, dst = _addresses(client[0], server[0])
        except ValueError:
            return None
        if not self._works:
            return None
        try:
            # The loopback device named: a socket bound to it (SO_BINDTODEVICE, which any
            # account may do) is found only so, and an unbound one either way. Unnamed, the
            # bound one was missed, or a listener of its port answered: it passed as untold.
            theirs = self._ask(_request(family, client[1], server[1], src, dst,
                                        self._loopback))
            if theirs is not None and theirs[0] not in (TCP_LISTEN, TCP_CLOSE):
                _, uid, inode = theirs
                # No inode: no process holds it any more (closed; in TIME_WAIT its uid
                # reads as root's). Its client has left: nobody to answer.
                return uid if inode else CLOSED
            # A lookup falls back on a listening socket: our end must be a connection.
            ours = self._ask(_request(family, server[1], client[1], dst, src))
        except OSError:
            self.close()  # a fresh socket next time
            return UNKNOWN  # it worked before: no failure lets a caller through untold
        return None if ours is not None and ours[0] in CONNECTED else CLOSED

    def _finds_its_own(self) -> bool | None:
        """Whether the kernel finds a connection of this process's own (a kernel without
        tcp_diag finds none): where it cannot, no caller can be told, nor refused for it.
        None: not known yet, the test itself failed for now (out of descriptors)."""
        try:
            with socket.create_server(("127.0.0.1", 0)) as listener, \
                    socket.create_connection(listener.getsockname(), timeout=1) as client:
                family, src, dst = _addresses("127.0.0.1", "127.0.0.1")
                found = self._ask(_request(family, client.getsockname()[1],
                                           listener.getsockname()[1], src, dst))
        except OSError as exc:
            self.close()
            if isinstance(exc, TimeoutError) or exc.errno in FOR_NOW:
                return None
            return False  # no netlink sock_diag here (a sandbox's kernel, say)
        return found is not None and found[1] == this_account()

    def _ask(self, request: bytes) -> tuple[int, int, int] | None:
        """The state, uid and inode of the socket asked for; None if there is none."""
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
            return int(fields[1]), int(fields[8]), int(fields[9])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _request(family: int, sport: int, dport: int, src: bytes, dst: bytes,
             interface: int = 0) -> bytes:
    """inet_diag_req_v2 for the one TCP socket with these addresses, in any state (and
    bound to `interface`, if one is given)."""
    return (REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, ALL_STATES)
            + SOCKID.pack(sport, dport, src, dst)
            + SOCKID_REST.pack(interface, NO_COOKIE, NO_COOKIE))


def _loopback_index() -> int:
    """The loopback device's index (0 where there is none to tell): the one device a
    socket bound to one can reach 127.0.0.1 or ::1 through."""
    try:
        return socket.if_nametoindex("lo") if AVAILABLE else 0
    except OSError:
        return 0


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
    """The uid a connection must come from, where it can be told (Linux)."""
    if sys.platform == "linux":
        return os.geteuid()
    return None
