"""A request body over MAX_BODY_BYTES is a 413 with OpenAI's error body, said as soon as the size is known: by its
Content-Length before any of the body is read, and for a chunked body at the chunk that passes the limit (it was held
in memory to its end first, however long)."""

from __future__ import annotations

import json
import socket
import threading

import pytest

from onnxpipe.serve.app import MAX_BODY_BYTES, ServerThread, create_app

MODEL = "llama-stdlib"


@pytest.fixture(scope="module")
def server(stdlib_lm):
    with ServerThread(create_app(stdlib_lm, MODEL, max_batch=2, max_queue=2)) as s:
        yield s


def head(length_header: str) -> bytes:
    return (f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{length_header}\r\n"
            "Connection: close\r\n\r\n").encode()


def response(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the one response on ``sock`` (read to its close; a timeout fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head_, body = data.split(b"\r\n\r\n", 1)
    return int(head_.split()[1]), json.loads(body)


def test_a_content_length_over_the_limit_is_a_413_before_the_body(server):
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head(f"Content-Length: {MAX_BODY_BYTES + 1}"))  # and no byte of the body
        status, body = response(sock)
    assert status == 413 and "larger than 4 MiB" in body["error"]["message"], body
    assert body["error"]["type"] == "invalid_request_error"


def test_a_chunked_body_is_refused_at_the_chunk_past_the_limit_not_at_its_end(server):
    """The body's last chunk is never sent: the 413 must come while the server still waits for more."""
    chunk = b"x" * (64 << 10)
    assert MAX_BODY_BYTES % len(chunk) == 0
    sock = socket.create_connection((server.host, server.port), timeout=10)

    def send() -> None:
        try:
            sock.sendall(head("Transfer-Encoding: chunked"))
            # the limit's bytes, one more, and no end chunk. Nothing after the byte that passes the limit: a server
            # that closes with bytes unread resets the connection, and the reset may discard its answer unread
            for _ in range(MAX_BODY_BYTES // len(chunk)):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"1\r\nx\r\n")
        except OSError:  # the server answered and closed the connection: the rest is not wanted
            pass

    sender = threading.Thread(target=send)
    sender.start()
    try:
        status, body = response(sock)
    finally:
        sender.join(10)
        sock.close()
    assert status == 413 and "larger than 4 MiB" in body["error"]["message"], body
