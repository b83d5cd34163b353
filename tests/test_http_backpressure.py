"""Backpressure over real sockets: a client that stops reading is cut as slow (it falls more
than --max-pending behind), costs bounded memory, delays no one, and loses nothing the history
holds when it comes back."""

from __future__ import annotations

import socket
import time

import pytest
from sse import wait_for

from hub.flusher import WINDOW

MAX_PENDING = 64 * 1024
EVENTS = 600
PAYLOAD = "x" * 2000  # ~2 KB frames: 1.2 MB in all, far past the bound and any socket buffer


def stuck_client(port: int, token: str) -> socket.socket:
    """A client with a tiny receive buffer that sends its request and never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET /events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
    )
    return sock


def drain(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the kernel holds for the client, up to the hub's close."""
    sock.settimeout(0.5)
    data = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def complete_ids(raw: bytes) -> list[str]:
    """Ids of the events that arrived whole (a frame cut by the close does not count; the
    opening's id-only block is no event)."""
    body = raw.split(b"\r\n\r\n", 1)[1].decode()
    ids = []
    for block in body.split("\n\n")[:-1]:
        lines = block.split("\n")
        if any(line.startswith("data: ") for line in lines):
            ids += [line[4:] for line in lines if line.startswith("id: ")]
    return ids


@pytest.mark.gen_test(timeout=30)
async def test_a_client_that_stops_reading_is_cut_delays_no_one_and_resumes_without_loss(
    hub_server,
):
    server = await hub_server(max_pending=MAX_PENDING, flush_interval=0.002)
    readers = [await server.stream(f"r{i}") for i in range(3)]
    stuck = stuck_client(server.port, server.token("slow"))
    assert await wait_for(lambda: len(server.hub.registry.all) == 4, 5)
    [slow_sub] = [s for s in server.hub.registry.all if s.user == "slow"]
    conn = slow_sub.transport

    ids: list[str] = []
    most_held = 0
    for _ in range(EVENTS // 20):
        ids += await server.publish_ok([{"type": "broadcast", "data": PAYLOAD}] * 20)
        most_held = max(most_held, conn.pending_size)
        # the pass carrying this batch is done (written, or the stream cut) before the next
        assert await wait_for(lambda: server.hub.flusher.idle, 5)

    # Everyone who reads got everything, in order, while the stuck client was stuck.
    for reader in readers:
        got = await reader.events(EVENTS, timeout=15)
        assert [e.id for e in got] == ids
    # The stuck client was cut as slow, and nothing of it is held any more.
    assert await wait_for(lambda: slow_sub not in server.hub.registry.all, 5)
    assert slow_sub.closed and conn.pending is None and conn.socket is None
    assert slow_sub.private is None and slow_sub not in server.hub.flusher.everyone.readers
    assert server.hub.metrics.disconnects.labels("slow")._value.get() == 1
    # What its socket held never passed one write.
    assert 0 < most_held <= WINDOW
    assert all(not r.closed for r in readers)

    # It comes back with the last id it saw whole and gets exactly the rest.
    seen = complete_ids(drain(stuck))
    stuck.close()
    assert seen == ids[: len(seen)] and len(seen) < EVENTS
    again = await server.stream("slow", last_event_id=seen[-1])
    rest = await again.events(EVENTS - len(seen), timeout=15)
    assert seen + [e.id for e in rest] == ids


@pytest.mark.parametrize(
    ("body", "count"),
    [
        ([{"type": 5}] * 12_000, 12_000),  # 152 KiB of body, ~1.4 MB of frames
        ([{"type": 2, "user": "r0"}] * 9_000, 9_000),
    ],
    ids=["12000-broadcasts", "9000-private"],
)
@pytest.mark.gen_test(timeout=60)
async def test_one_legal_publish_far_over_a_socket_buffer_cuts_no_reader(hub_server, body, count):
    """One in-limit body used to cut every recipient as slow at once (its frames were copied
    into every outbox and counted against the bound up front). Readers that read get it all."""
    server = await hub_server(history=20_000, max_batch=20_000)
    readers = [await server.stream("r0") for _ in range(3)]
    ids = await server.publish_ok(body)
    assert len(ids) == count
    for reader in readers:
        got = await reader.events(count, timeout=40)
        assert [e.id for e in got] == ids
    assert server.hub.metrics.disconnects.labels("slow")._value.get() == 0
    assert all(not r.closed for r in readers)
