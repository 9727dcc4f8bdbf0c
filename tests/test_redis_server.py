"""The embedded redis-server: start, status, stop on a free port, with data under its own directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.redis_server import RedisServer, RedisServerError, free_port


def test_start_status_stop_on_a_free_port(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "redis", port=free_port(), persist=False)
    assert not server.is_running()
    server.start()
    try:
        assert server.is_running()
        assert server.pid_file.exists()
        client = server.client()
        client.set("k", "v")
        assert client.get("k") == b"v"
        server.start()  # a second start is a no-op on a running server
        assert server.is_running()
    finally:
        assert server.stop() is True
    assert not server.is_running()
    assert not server.pid_file.exists()
    assert server.stop() is False  # nothing left to stop


def test_kill_is_seen_as_down(tmp_path: Path) -> None:
    server = RedisServer(data_dir=tmp_path / "redis", port=free_port(), persist=False)
    server.start()
    server.kill()
    assert not server.is_running()
    server.stop()


def test_a_missing_binary_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisServerError, match="redis-server is not installed"):
        RedisServer(data_dir=tmp_path / "redis", port=free_port()).start()
