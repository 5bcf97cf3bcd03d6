"""TLS through memory (eyewall/tls/layers.py): a close_notify never costs the peer's
reply, and the first bytes of a connection tell TLS from HTTP."""

from __future__ import annotations

import ssl

import pytest
import trustme

from eyewall.tls.layers import TLSLayer, TLSStack, starts_tls


def connected(ca: trustme.CA) -> tuple[TLSStack, TLSStack]:
    """(server, client) stacks with their handshake done, records carried by hand."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    server = TLSLayer(server_ctx, server_side=True)
    client = TLSLayer(client_ctx, server_side=False, server_hostname="localhost")
    done = False
    while not done:
        done = client.handshake()
        server.incoming.write(client.outgoing.read())
        done = server.handshake() and done
        client.incoming.write(server.outgoing.read())
    ours, theirs = TLSStack([server]), TLSStack([client])
    assert theirs.receive(b"") == b""  # the server's session tickets
    return ours, theirs


def carry(stack: TLSStack) -> bytes:
    records = bytes(stack.outgoing)
    stack.outgoing.clear()
    return records


def test_a_close_notify_sent_while_the_peers_reply_is_on_its_way_loses_nothing(ca):
    """The fault ssl.SSLSocket has (its shutdown reads, and fails on application data
    already there): here the reply is read after our close_notify, by a read."""
    ours, theirs = connected(ca)
    theirs.send(b"reply")
    on_the_wire = carry(theirs)  # arrived, not read yet
    ours.close_notify()
    assert ours.receive(on_the_wire) == b"reply" and not ours.ended
    assert theirs.receive(carry(ours)) == b"" and theirs.ended  # they see our end
    theirs.send(b"more after it")  # RFC 8446 §6.1: the other direction goes on
    theirs.close_notify()
    assert ours.receive(carry(theirs)) == b"more after it" and ours.ended


def test_why_nothing_may_wait_unread_when_close_notify_is_sent(ca):
    """What an ssl.SSLSocket's shutdown meets when the reply is already in the socket:
    OpenSSL's second shutdown step reads it and fails.  `TLSStack.receive` leaves the
    incoming buffer empty, so `close_notify` never meets this."""
    ours, theirs = connected(ca)
    theirs.send(b"reply")
    ours.layers[0].incoming.write(carry(theirs))  # there, but not read
    with pytest.raises(ssl.SSLError, match="APPLICATION_DATA_AFTER_CLOSE_NOTIFY"):
        ours.close_notify()


def test_records_split_anywhere_are_put_together(ca):
    ours, theirs = connected(ca)
    theirs.send(b"x" * 40_000)  # three records
    records = carry(theirs)
    got = b"".join(ours.receive(records[i : i + 7]) for i in range(0, len(records), 7))
    assert got == b"x" * 40_000


@pytest.mark.parametrize(
    ("first", "tls"),
    [
        (bytes.fromhex("16030100c8010000c4"), True),  # a TLS ClientHello record
        (bytes.fromhex("16"), True),  # its first byte alone
        (bytes.fromhex("802e0103010015"), True),  # an SSL 2.0-format ClientHello
        (bytes.fromhex("80"), True),
        (b"GET / HTTP/1.1\r\n", False),
        (b"CONNECT h:443 HTTP/1.1\r\n", False),
        (b"\r\nGET", False),
        (bytes.fromhex("802e05"), False),  # top bit set, but not a CLIENT-HELLO
        (b"", False),
    ],
)
def test_the_first_bytes_tell_a_tls_hello_from_http(first, tls):
    assert starts_tls(first) is tls
