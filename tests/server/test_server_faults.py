"""Faults against one live server (`fault_injection`: ember serve with planted engine faults):
clients that stop reading, a request cancelled while it waits, one request failing inside a
step (it alone fails), and the whole step failing (the server fails fast: every request in
flight gets an error, the process exits 1; it never hangs). The last test ends the server.

(test_server.py covers clients that disconnect mid-stream and the SIGTERM shutdown.)
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import ONE_THREAD
from fault_injection import REQUEST_FAULT, STEP_FAULT
from server_utils import ServerProcess

COMP = "/v1/completions"
CHAT = "/v1/chat/completions"
SEND_TIMEOUT = 3.0
SLOTS = 4  # --max-num-seqs


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--max-num-seqs", str(SLOTS), "--send-timeout", str(SEND_TIMEOUT),
                        "--max-model-len", "1024", "--kv-cache-memory", "200000000",
                        module="fault_injection", env=ONE_THREAD)
    yield srv.wait_ready()
    srv.stop()


def idle(server, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (server.metric("ember:num_requests_running") == 0
                and server.metric("ember:num_requests_waiting") == 0
                and server.metric("ember:num_requests_in_flight") == 0
                and server.metric("ember:kv_cache_usage_perc") == 0):
            return True
        time.sleep(0.1)
    return False


def aborted(server) -> float:
    return server.metric("ember:request_aborted_total")


def raw_request(server, body: dict, path: str = COMP, small_buffers: bool = False
                ) -> socket.socket:
    """POST `body` on a raw socket and return it unread. `small_buffers`: a small receive
    buffer and segment size, so that the kernel buffers little of what the server sends (on
    loopback it would take megabytes otherwise)."""
    s = socket.socket()
    if small_buffers:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1000)
    s.settimeout(30)
    s.connect(("127.0.0.1", server.port))
    payload = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return s


def read_events(s: socket.socket, count: int) -> None:
    seen = b""
    while seen.count(b"\ndata: ") + seen.startswith(b"data: ") < count:
        chunk = s.recv(256)
        assert chunk, "the server closed the stream"
        seen += chunk


def completion(server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}{COMP}", json={"prompt": "The capital of France is",
                                                   "max_tokens": 4, **body}, timeout=60)


# ---- slow clients -------------------------------------------------------------------------
def test_clients_that_stop_reading_block_no_one(server):
    before = aborted(server)
    # Large events (20 logprobs a token, 1.3 kB), many of them: more than the buffers hold.
    big = {"messages": [{"role": "user", "content": "Tell me a long story."}],
           "max_tokens": 900, "ignore_eos": True, "stream": True, "logprobs": True,
           "top_logprobs": 20}
    never_reads = raw_request(server, big, CHAT, small_buffers=True)
    stops_reading = raw_request(server, big, CHAT, small_buffers=True)
    read_events(stops_reading, 5)  # reads a little, then stops mid-stream
    try:
        # Others are served meanwhile (the stalled connections stay open to the end).
        for _ in range(3):
            r = completion(server, ignore_eos=True)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        # Each stalled stream is dropped SEND_TIMEOUT after its buffers filled: its request
        # is aborted (it would run 900 tokens otherwise) and its KV blocks come back.
        deadline = time.monotonic() + 60
        while aborted(server) - before < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert aborted(server) - before == 2
        assert idle(server)
        assert server.log().count("accepted no data for") == 2
    finally:
        never_reads.close()
        stops_reading.close()
    assert completion(server).status_code == 200


def test_request_cancelled_while_queued(server):
    before = aborted(server)
    long = {"prompt": "Count to one hundred:", "max_tokens": 100, "ignore_eos": True,
            "stream": True}

    def stream(_: int) -> str:
        with httpx.stream("POST", f"{server.url}{COMP}", json=long, timeout=120) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        return lines[-1]

    with ThreadPoolExecutor(SLOTS) as pool:
        running = [pool.submit(stream, i) for i in range(SLOTS)]  # every slot taken
        deadline = time.monotonic() + 30
        while (server.metric("ember:num_requests_running") < SLOTS
               and time.monotonic() < deadline):
            time.sleep(0.05)
        queued = raw_request(server, {"prompt": "I wait in the queue", "max_tokens": 50})
        while server.metric("ember:num_requests_waiting") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.metric("ember:num_requests_waiting") == 1
        queued.close()  # the client gives up while its request waits
        deadline = time.monotonic() + 5
        while server.metric("ember:num_requests_waiting") > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.metric("ember:num_requests_waiting") == 0
        assert aborted(server) - before == 1
        # The running ones go on to the end.
        assert [f.result(timeout=120) for f in running] == ["data: [DONE]"] * SLOTS
    assert idle(server)


# ---- engine faults ------------------------------------------------------------------------
def test_one_request_failing_inside_a_step_fails_alone(server):
    def call(body: dict) -> tuple[int, dict]:
        r = httpx.post(f"{server.url}{COMP}", json={"max_tokens": 8, "ignore_eos": True,
                                                     **body}, timeout=60)
        return r.status_code, r.json()

    ok = {"prompt": "The capital of France is"}
    bad = {"prompt": REQUEST_FAULT + [100, 200]}
    with ThreadPoolExecutor(4) as pool:  # in the same batches as the failing ones
        results = list(pool.map(call, [ok, bad, ok, {**bad, "stream": True}], timeout=120))
    for status, body in results[0], results[2]:
        assert status == 200 and body["usage"]["completion_tokens"] == 8
    for status, body in results[1], results[3]:
        assert status == 500, body
        assert body["error"]["code"] == "request_failed"
    assert "injected fault in one request" in server.log()
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert idle(server)
    assert completion(server).status_code == 200


def test_a_failing_step_fails_fast(server):
    """The last test of the module: the server exits."""
    long = {"prompt": "Count to one hundred:", "max_tokens": 500, "ignore_eos": True,
            "stream": True}
    started = threading.Barrier(3, timeout=60)

    def stream(_: int) -> str:
        last = ""
        with httpx.stream("POST", f"{server.url}{COMP}", json=long, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    if not last:
                        started.wait()
                    last = line
                    if '"error"' in line:
                        return json.loads(line[6:])["error"]["type"]
        return last

    with ThreadPoolExecutor(2) as pool:
        streams = [pool.submit(stream, i) for i in range(2)]
        started.wait()
        t0 = time.monotonic()
        r = completion(server, prompt=STEP_FAULT + [100])
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
        try:  # until it exits, the server says it is not healthy
            assert httpx.get(f"{server.url}/health", timeout=5).status_code == 503
        except httpx.TransportError:
            pass
        assert [f.result(timeout=30) for f in streams] == ["service_unavailable_error"] * 2
    assert server.proc.wait(timeout=30) == 1, server.log()
    assert time.monotonic() - t0 < 20
    log = server.log()
    assert "injected fault: device lost" in log and "the engine is dead" in log
