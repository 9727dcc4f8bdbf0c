"""A real S3-protocol server for the tests: moto's standalone server (the stand-in for MinIO, which
cannot be installed here) in its own process on loopback, and a TCP relay in front of it that can hold
a lake upload half-sent or hold its reply, so that a writer can be killed mid-upload or just after it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from common.redis_server import free_port

# Moto takes any credentials; these only make botocore sign its requests the way it does for MinIO.
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "moto-test-key",
    "AWS_SECRET_ACCESS_KEY": "moto-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def s3_env(endpoint: str) -> dict[str, str]:
    """The variables compose gives every Lambdarec service for its MinIO (docker/compose.yaml)."""
    return {**TEST_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint}


@dataclass
class MotoServer:
    """`python -m moto.server` on a free loopback port, in its own process."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **TEST_CREDENTIALS},
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


Hold = Literal["request", "response"]


class UploadStaller:
    """A loopback TCP relay to the S3 server. While armed with `hold`, every PUT of a .parquet object is
    held: "request" forwards only its headers and half its body (the object never completes),
    "response" forwards it whole but never returns the server's final reply (the object exists, the
    writer does not know). Every PUT, since botocore retries on a new connection. `held` is set once
    one is held; a held connection stays stuck until the client dies. Disarmed, it relays everything."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.hold: Hold | None = None
        self.held = threading.Event()
        self._lock = threading.Lock()  # arm() sets hold and clears held together
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def arm(self, hold: Hold | None) -> None:
        with self._lock:
            self.held.clear()
            self.hold = hold

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            holding_reply = threading.Event()
            threading.Thread(target=self._requests, args=(client, upstream, holding_reply), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client, holding_reply), daemon=True).start()

    def _requests(self, client: socket.socket, upstream: socket.socket, holding_reply: threading.Event) -> None:
        cut_body, stuck = False, False
        while chunk := _recv(client):
            if stuck:
                continue  # swallow the rest until the client dies
            if cut_body:  # the held PUT's body (botocore sends it after the server's 100 Continue)
                upstream.sendall(chunk[: len(chunk) // 2])
                stuck = True
                self.held.set()
                continue
            hold = self.hold if _puts_parquet(chunk) else None
            if hold == "request":
                head, separator, body = chunk.partition(b"\r\n\r\n")
                upstream.sendall(head + separator + body[: len(body) // 2])
                if body:
                    stuck = True
                    self.held.set()
                else:
                    cut_body = True
                continue
            if hold == "response":
                holding_reply.set()
            upstream.sendall(chunk)
        _close(client, upstream)

    def _replies(self, upstream: socket.socket, client: socket.socket, holding_reply: threading.Event) -> None:
        while chunk := _recv(upstream):
            if holding_reply.is_set():
                while chunk.startswith(b"HTTP/1.1 100"):  # interim answers (Werkzeug sends two): let the body come
                    head, separator, chunk = chunk.partition(b"\r\n\r\n")
                    client.sendall(head + separator)
                if not chunk:
                    continue
                self.held.set()
                continue  # the server answered the held PUT: the object is there, the client never hears
            client.sendall(chunk)
        _close(client, upstream)


def _puts_parquet(chunk: bytes) -> bool:
    request_line = chunk.split(b"\r\n", 1)[0]
    return request_line.startswith(b"PUT ") and b".parquet" in request_line


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1 << 16)
    except OSError:
        return b""


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
