"""`cm serve` itself: it starts over a database, answers `/`, keeps the API off without a token, stops cleanly."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import run_cm_process
from serve_process import ServeProcess


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_serve_answers_and_stops_cleanly(db_url: str, serve_factory: Callable[..., ServeProcess]) -> None:
    server = serve_factory(db_url)
    status, page = get(server.url + "/")
    assert status == 200 and "unsubscribe link" in page
    # No token configured: no API, no OpenAPI document, no docs.
    assert get(server.url + "/openapi.json")[0] == 404
    assert get(server.url + "/docs")[0] == 404
    assert server.stop(signal.SIGINT) == 0
    assert "Traceback" not in server.stderr()


def test_api_token_turns_on_the_api_and_offline_docs(
    sqlite_url: str, serve_factory: Callable[..., ServeProcess]
) -> None:
    server = serve_factory(sqlite_url, env={"CM_API_TOKEN": "t0ken"})
    status, body = get(server.url + "/openapi.json")
    assert status == 200 and json.loads(body)["info"]["title"] == "cm"
    status, page = get(server.url + "/docs")
    assert status == 200 and "/docs-assets/swagger-ui-bundle.js" in page and "cdn" not in page.lower()
    assert get(server.url + "/docs-assets/swagger-ui-bundle.js")[0] == 200


def test_port_in_use_is_one_line(sqlite_url: str, tmp_path: Path, serve_factory: Callable[..., ServeProcess]) -> None:
    server = serve_factory(sqlite_url)
    port = server.url.rsplit(":", 1)[1]
    done = run_cm_process(["--database", sqlite_url, "serve", "--port", port], env={}, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_missing_database_is_refused(tmp_path: Path) -> None:
    missing = f"sqlite:///{tmp_path / 'nope.db'}"
    done = run_cm_process(["--database", missing, "serve", "--port", "0"], env={}, cwd=tmp_path)
    assert done.returncode == 6 and "Traceback" not in done.stderr


@pytest.mark.parametrize("entry", ["10.0.0.0/8", "::1"])
def test_trusted_proxy_entries_parse(entry: str) -> None:
    from campaign_manager.serve.clients import client_ip, trusted_networks

    networks = trusted_networks([entry])
    peer = "10.1.2.3" if "." in entry else "::1"
    assert client_ip(peer, "203.0.113.9, " + peer, networks) == "203.0.113.9"
    assert client_ip("192.0.2.1", "203.0.113.9", networks) == "192.0.2.1"  # an untrusted peer's header is ignored


def test_every_answer_is_private(sqlite_url: str, serve_factory: Callable[..., ServeProcess]) -> None:
    """Pages, FastAPI's own errors (a 405, a 404) and the API alike: no-store, no-referrer, noindex."""
    server = serve_factory(sqlite_url, env={"CM_API_TOKEN": "t0ken"})
    for path in ("/", "/undo/" + "A" * 44, "/nowhere", "/openapi.json"):
        try:
            with urllib.request.urlopen(server.url + path, timeout=10) as answer:
                headers = answer.headers
        except urllib.error.HTTPError as exc:
            headers = exc.headers
        assert headers["Cache-Control"] == "no-store", path
        assert headers["Referrer-Policy"] == "no-referrer", path
        assert headers["X-Robots-Tag"] == "noindex", path


def test_connections_are_accepted_with_nodelay() -> None:
    """`cm serve` binds its own socket; asyncio sets TCP_NODELAY only on connections of a socket made with proto
    IPPROTO_TCP. Without it, each answer after the first on a kept-alive connection waited ~40 ms (Nagle against the
    client's delayed ACK): 22 requests a second on one connection."""
    import asyncio
    import socket

    from campaign_manager.serve.server import bind

    async def accepted_nodelay() -> int:
        listening = bind("127.0.0.1", 0)
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(connected, sock=listening)
        port = listening.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_a_burst_beyond_threads_and_connections_is_answered(
    postgres_url: str, serve_factory: Callable[..., ServeProcess]
) -> None:
    """More requests at once than route threads plus the engine's 30 PostgreSQL connections: each is answered. (A
    route thread once checked its connection out itself, and FastAPI validated the answer and ended the session on
    the same pool of threads: with 2 threads, 32 clients were enough for not one answer.)"""
    from concurrent.futures import ThreadPoolExecutor

    server = serve_factory(postgres_url, env={"CM_API_TOKEN": "t0ken", "CM_SERVE_THREADS": "2"})
    url, headers = server.url + "/recipients/?limit=10", {"Authorization": "Bearer t0ken"}
    with ThreadPoolExecutor(80) as pool:
        answers = list(pool.map(lambda _: get(url, headers)[0], range(240)))
    assert answers == [200] * 240
