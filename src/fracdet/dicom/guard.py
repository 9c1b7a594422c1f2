"""Bounds on what a DICOM peer can make the node hold, enforced on the wire before a PDU is decoded.

pynetdicom reads each PDU whole, as long as its 4-byte length field says (up to 4 GiB), before it knows who
sent it: any peer that reaches the port, before its association request is read and its AE title checked,
could make the node hold gigabytes (1 GiB streamed in 1.6 s took ``fracdet pacs listen`` from 0.8 to 1.8 GB),
and one that announces a PDU and then stalls held a thread for as long as it liked. A C-STORE's dataset is
assembled in memory, so an allowed caller sending a 4 GiB image claimed twice that.

:class:`PeerGuard` takes the place of the association socket's ``recv`` (installed when the connection
opens, before a byte is read) and holds, per connection:

* no PDU longer than ``max_pdu`` bytes: refused when its header announces it, before its body is read (the
  node advertises pynetdicom's 16 KiB; the default 1 MiB leaves room for peers that ignore it);
* every PDU whole within ``timeout_s`` of its first byte: a peer that trickles or stalls is let go;
* no DIMSE message (a C-STORE's dataset) longer than ``max_message`` bytes, counted as its P-DATA arrives:
  refused as soon as the next PDU would pass it, so no more than that is ever held for one image.

A refusal ends the read short, which pynetdicom treats as a closed connection: it logs the short PDU and
ends the association (a PACS sees it aborted and retries by its own policy). The guard reports each refusal
through ``on_refusal`` in words without identifiers.

Connections that have not yet sent their association request hold no association slot
(:func:`node_ae`): pynetdicom counted every open connection against ``maximum_associations``, so four
sockets that sent nothing, from any host that reaches the port, made the node reject every modality's
association (*Local Limit Exceeded*) for the 30 s it waits for a request, again each time they were opened
(``benchmarks/dicom_peers.py``). Such connections are bounded apart: :data:`MAX_WAITING_PER_ADDRESS` from
one address, :data:`MAX_WAITING` in all; beyond them a new connection is closed at once.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_WAITING", "MAX_WAITING_PER_ADDRESS", "PeerGuard", "awaiting_request", "node_ae"]

#: Connections from one address that may wait, at once, before sending their association request: a modality
#: or PACS opens its associations one after another and sends each request at once.
MAX_WAITING_PER_ADDRESS = 4
#: Connections from all addresses that may wait at once (each is a thread of pynetdicom's until its request
#: arrives or its 30 s pass).
MAX_WAITING = 64
_P_DATA = 0x04
_HEADER = 6  # PDU type, reserved, 4-byte big-endian length


class PeerGuard:
    """Bounded, time-limited reads for one association's socket; see the module's docstring."""

    def __init__(self, sock: Any, *, max_pdu: int, max_message: int, timeout_s: float,
                 on_refusal: Callable[[str], None]) -> None:  # fmt: skip
        self._sock = sock  # pynetdicom's AssociationSocket; its raw socket is read here
        self.max_pdu, self.max_message, self.timeout_s = max_pdu, max_message, timeout_s
        self._on_refusal = on_refusal
        self._next: tuple[int, int] | None = None  # the (type, length) of the PDU whose body comes next
        self._deadline = 0.0
        self.message_bytes = 0  # P-DATA bytes of the DIMSE message being received
        self.refused = False  # once refused, nothing more is read: the connection is ending

    @classmethod
    def install(cls, assoc: Any, **limits: Any) -> PeerGuard:
        """Guard ``assoc``'s reads from now on; call it when the connection opens (``evt.EVT_CONN_OPEN``)."""
        guard = cls(assoc.dul.socket, **limits)
        assoc.dul.socket.recv = guard.recv
        return guard

    def recv(self, nr_bytes: int) -> bytearray:
        """What pynetdicom's reader asks for: a PDU's 6-byte header, then its body of the length it gave."""
        if self.refused:
            return bytearray()
        if self._next is None:  # a header: the PDU's first bytes are here (the reader waited for them)
            self._deadline = time.monotonic() + self.timeout_s
            header = self._read(nr_bytes)
            if len(header) == _HEADER:
                pdu_type, _, length = struct.unpack(">BBL", header)
                self._next = (pdu_type, length)
            return header
        pdu_type, length = self._next
        self._next = None
        if length > self.max_pdu:
            return self.refuse(f"a peer announced a PDU of {length:,} bytes, more than the {self.max_pdu:,} read")
        if pdu_type == _P_DATA and self.message_bytes + length > self.max_message:
            self.message_bytes = 0
            return self.refuse(f"a peer sent a DICOM message of more than {self.max_message / 2**20:g} MiB")
        body = self._read(nr_bytes)
        if pdu_type == _P_DATA and len(body) == length:
            self.message_bytes += length
            if _ends_a_message(body):
                self.message_bytes = 0
        return body

    def _read(self, nr_bytes: int) -> bytearray:
        """Up to ``nr_bytes``, fewer if the peer closes or the PDU's deadline passes."""
        raw = self._sock.socket
        data = bytearray()
        if raw is None:
            return data
        previous = raw.gettimeout()
        try:
            while len(data) < nr_bytes:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    return self.refuse(f"a peer did not send a whole PDU within {self.timeout_s:g} s")
                raw.settimeout(left)
                try:
                    chunk = raw.recv(min(nr_bytes - len(data), 1 << 16))
                except TimeoutError:
                    continue
                if not chunk:
                    break
                data += chunk
        finally:
            with contextlib.suppress(OSError):  # closed meanwhile
                raw.settimeout(previous)
        return data

    def refuse(self, reason: str) -> bytearray:
        """Report, and end the connection: nothing more is read from it (the short read ends the association)."""
        self.refused = True
        self._on_refusal(f"{reason}: connection closed")
        with contextlib.suppress(OSError, AttributeError):  # already closed
            self._sock.socket.shutdown(socket.SHUT_RDWR)
        return bytearray()


def awaiting_request(assoc: Any) -> bool:
    """Whether an acceptor association's peer has connected but not yet sent its association request: its
    thread not started yet, or running with its state machine in Sta2 (PS3.8 9.2: transport open, awaiting
    the A-ASSOCIATE-RQ) or still in Sta1 (its reactor has not yet seen the connection)."""
    if assoc.ident is None:
        return True
    return assoc.is_alive() and assoc.dul.state_machine.current_state in ("Sta1", "Sta2")


def node_ae(ae_title: str) -> Any:
    """A pynetdicom ``AE`` whose ``maximum_associations`` counts only associations whose peers have sent
    their request (pynetdicom counts each connection from the moment it opens; see the module's docstring)."""
    from pynetdicom import AE

    class NodeAE(AE):
        @property
        def active_associations(self) -> list[Any]:
            return [assoc for assoc in super().active_associations if not awaiting_request(assoc)]

    return NodeAE(ae_title=ae_title)


def _ends_a_message(body: bytes | bytearray) -> bool:
    """Whether a P-DATA-TF body holds the last fragment of a command or dataset (PS3.8 9.3.5.1, E.2): each
    item is a 4-byte length, a presentation context ID, a control header (bit 1: last fragment), data."""
    offset = 0
    while offset + 6 <= len(body):
        (item_length,) = struct.unpack_from(">L", body, offset)
        if body[offset + 5] & 0x02:
            return True
        offset += 4 + item_length
    return False
