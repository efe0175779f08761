"""The HTTP server and its route table, driven by real clients on loopback.

Each test starts a server on a free port, on uvloop where installed (as the services run), and
mostly speaks raw HTTP/1.1 to it, so what is checked is the bytes a client sees; hostile
inputs are each followed by a good request, to show the server is still up.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from collage_inference.config import Limits
from collage_inference.errors import (
    ConfigError,
    DataError,
    ListenError,
    OverloadedError,
    ProtocolError,
    UnauthorizedError,
)
from collage_inference.serving.web import connection
from collage_inference.serving.web.routes import (
    TOKEN_ENV,
    Request,
    Response,
    Route,
    Router,
    check_token,
    error_response,
    load_token,
    run,
)
from collage_inference.serving.web.server import Listening, serve, start_server

LIMITS = Limits(max_body_bytes=1000, body_timeout=0.3)
MiB = 2**20
Answer = tuple[int, dict[str, str], bytes]


class Service:
    """A few endpoints that record what they were called with."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[bytes] = []
        self.statuses: list[int] = []

    async def later(self, request: Request) -> Response:
        self.calls.append(request.body)
        await asyncio.sleep(self.delay)
        if request.body == b"bad":
            raise ProtocolError("that body is bad; send a good one")
        if request.body == b"crash":
            raise RuntimeError("a bug with a secret in it")
        tag = request.headers.get("x-tag", "")
        return Response(b"later:" + request.body, headers={"Content-Type": "text/plain", "X-Seen": tag})

    def now(self, request: Request) -> Response:
        """Answers without awaiting, as a worker does when it computes inline."""
        self.calls.append(request.body)
        if request.body == b"bad":
            raise ProtocolError("that body is bad; send a good one")
        return Response(b"now:" + request.body)

    def model(self, request: Request) -> Response:
        return Response.json({"name": request.params["name"], "query": request.query})

    def router(self, token: str | None = None) -> Router:
        routes = [
            Route("POST", "/later", self.later),
            Route("POST", "/now", self.now),
            Route("GET", "/v2/health/ready", lambda _: Response.text("ok")),
            Route("GET", "/v2/models/{name}", self.model),
            Route("POST", "/v2/models/{name}/infer", self.now),
        ]
        return Router(routes, token=token, on_status=self.statuses.append)


@asynccontextmanager
async def serving(
    service: Service, limits: Limits = LIMITS, token: str | None = None
) -> AsyncIterator[Listening]:
    listening = await start_server(service.router(token), "127.0.0.1", 0, limits)
    try:
        yield listening
    finally:
        await listening.close(1.0)


async def connect(listening: Listening) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", listening.port)


def post(body: bytes, path: str = "/later", extra: str = "", version: str = "1.1") -> bytes:
    head = f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def read_answer(reader: asyncio.StreamReader, head_only: bool = False) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b"" if head_only else await reader.readexactly(int(headers.get("content-length", 0)))
    return int(lines[0].split(" ")[1]), headers, body


async def still_serves(listening: Listening) -> None:
    reader, writer = await connect(listening)
    writer.write(post(b"alive", "/now"))
    assert (await read_answer(reader))[:3:2] == (200, b"now:alive")
    writer.close()


def in_loop(test: Callable[[], Awaitable[None]]) -> None:
    run(asyncio.wait_for(test(), 20))


# -- the route table --------------------------------------------------------------------------


def test_routes_exact_and_with_params_404_405_and_head() -> None:
    async def test() -> None:
        service = Service()
        async with serving(service) as listening:
            reader, writer = await connect(listening)
            writer.write(b"GET /v2/models/m1?v=2 HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = await read_answer(reader)
            assert status == 200 and json.loads(body) == {"name": "m1", "query": "v=2"}
            assert headers["content-type"] == "application/json"
            writer.write(post(b"p", "/v2/models/m1/infer"))
            assert (await read_answer(reader))[2] == b"now:p"
            writer.write(b"HEAD /v2/models/m1 HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = await read_answer(reader, head_only=True)
            assert status == 200 and int(headers["content-length"]) > 0  # the GET answer's length
            writer.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")  # no body came after the HEAD
            status, _, body = await read_answer(reader)
            assert status == 404 and "/nowhere" in json.loads(body)["error"]
            writer.write(b"GET /now HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = await read_answer(reader)
            assert status == 405 and headers["allow"] == "POST"
            writer.write(b"DELETE /v2/models/m1 HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = await read_answer(reader)
            assert status == 405 and headers["allow"] == "GET, HEAD"
            assert service.statuses == [200, 200, 200, 404, 405, 405]
            writer.close()

    in_loop(test)


def test_the_token_guards_all_but_the_health_checks() -> None:
    async def test() -> None:
        service = Service()
        async with serving(service, token="s3cret") as listening:
            reader, writer = await connect(listening)
            writer.write(post(b"x", extra="Authorization: Bearer wrong\r\n"))
            status, headers, body = await read_answer(reader)
            assert status == 401 and headers["www-authenticate"].startswith("Bearer")
            assert "token" in json.loads(body)["error"]
            writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await read_answer(reader))[:3:2] == (200, b"ok")
            writer.write(post(b"x", extra="Authorization: Bearer s3cret\r\n"))
            assert (await read_answer(reader))[2] == b"later:x"
            assert service.calls == [b"x"]  # the refused request never reached the handler
            writer.close()

    in_loop(test)


def test_errors_are_json_with_the_shared_mapping_and_the_connection_survives() -> None:
    async def test() -> None:
        service = Service()
        async with serving(service) as listening:
            reader, writer = await connect(listening)
            for path in ("/later", "/now"):
                writer.write(post(b"bad", path))
                status, headers, body = await read_answer(reader)
                assert status == 400 and "send a good one" in json.loads(body)["error"]
                assert headers["content-type"] == "application/json"
            writer.write(post(b"crash"))
            status, _, body = await read_answer(reader)
            assert status == 500 and "secret" not in body.decode()
            writer.write(post(b"ok"))
            assert (await read_answer(reader))[0] == 200
            assert service.statuses == [400, 400, 500, 200]
            writer.close()

    in_loop(test)


def test_a_handler_that_answers_at_once_is_answered_at_once() -> None:
    service = Service()
    router = service.router()
    answer = router.handle(Request("POST", "/now", "", {}, b"x"))
    assert isinstance(answer, Response) and answer.body == b"now:x"  # no coroutine, no task
    answer = router.handle(Request("GET", "/v2/models/m", "", {}, b""))
    assert isinstance(answer, Response) and json.loads(answer.body)["name"] == "m"
    assert service.statuses == [200, 200]


def test_a_route_table_that_cannot_work_is_refused() -> None:
    def handler(_: Request) -> Response:
        return Response()

    for routes in (
        [Route("GET", "/a", handler), Route("GET", "/a", handler)],
        [Route("GET", "/a/x{name}", handler)],
        [Route("get", "/a", handler)],
    ):
        with pytest.raises(ConfigError):
            Router(routes)


def test_the_token_comes_from_the_file_else_the_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert load_token() is None
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert load_token() == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    assert load_token(tmp_path / "token") == "from-file"
    for content in ("", "two words", "a\r\nInjected: header"):
        (tmp_path / "bad").write_text(content)
        with pytest.raises(ConfigError, match="token"):
            load_token(tmp_path / "bad")
    with pytest.raises(ConfigError, match="cannot read"):
        load_token(tmp_path / "missing")


def test_check_token_and_error_response_map_every_case_once() -> None:
    check_token("/v2/models/m/infer", None, None)  # no token configured: open
    check_token("/v2/health/ready", None, "t")
    check_token("/metrics", "Bearer t", "t")
    for sent in (None, "", "Bearer x", "t", "bearer t"):
        with pytest.raises(UnauthorizedError):
            check_token("/metrics", sent, "t")
    answer = error_response(OverloadedError("full"))
    assert (answer.status, json.loads(answer.body), answer.headers["Retry-After"]) == (
        429,
        {"error": "full"},
        "1",
    )
    assert error_response(UnauthorizedError("no")).headers["WWW-Authenticate"].startswith("Bearer")
    answer = error_response(DataError("broken"))
    assert (answer.status, json.loads(answer.body)) == (500, {"error": "broken"})
    answer = error_response(RuntimeError("secret detail"))
    assert answer.status == 500 and b"secret" not in answer.body


# -- HTTP/1.1 ---------------------------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async def test() -> None:
        service = Service()
        async with serving(service) as listening:
            reader, writer = await connect(listening)
            for i in range(3):
                writer.write(post(f"n{i}".encode(), extra="X-Tag: t\r\n"))
                status, headers, body = await read_answer(reader)
                assert (status, body, headers["x-seen"]) == (200, f"later:n{i}".encode(), "t")
                assert headers["server"] == "collage-inference" and "date" in headers
                assert "connection" not in headers
            assert service.calls == [b"n0", b"n1", b"n2"]
            writer.close()

    in_loop(test)


def test_pipelined_requests_are_answered_in_order_once_each() -> None:
    async def test() -> None:
        service = Service(delay=0.01)
        async with serving(service) as listening:
            reader, writer = await connect(listening)
            writer.write(b"".join(post(f"p{i}".encode(), "/later" if i % 2 else "/now") for i in range(6)))
            bodies = [(await read_answer(reader))[2] for _ in range(6)]
            assert bodies == [f"{'later' if i % 2 else 'now'}:p{i}".encode() for i in range(6)]
            assert len(service.calls) == 6
            writer.close()

    in_loop(test)


def test_handlers_that_answer_at_once_serve_a_long_pipeline_in_order() -> None:
    async def test() -> None:
        service = Service()
        async with serving(service) as listening:
            reader, writer = await connect(listening)
            count = 3000  # answered in one loop, not one nested call per request
            writer.write(b"".join(post(str(i).encode(), "/now") for i in range(count)) + post(b"bad", "/now"))
            bodies = [(await read_answer(reader))[2] for _ in range(count)]
            assert bodies == [f"now:{i}".encode() for i in range(count)]
            assert (await read_answer(reader))[0] == 400
            writer.write(post(b"mixed") + post(b"again", "/now"))  # a later answer, then an at-once one
            assert [(await read_answer(reader))[2] for _ in range(2)] == [b"later:mixed", b"now:again"]
            writer.close()

    in_loop(test)


def test_a_client_pipelining_more_than_the_limit_ahead_is_paused_not_dropped() -> None:
    async def test() -> None:
        service = Service()
        async with serving(service) as listening:
            reader, writer = await connect(listening)
            bodies = [b"%04d" % i + b"x" * 896 for i in range(300)]  # 270 kB ahead, answered by tasks
            writer.write(b"".join(post(body) for body in bodies))
            assert [(await read_answer(reader))[2] for _ in bodies] == [b"later:" + body for body in bodies]
            writer.close()

    in_loop(test)


def test_http_1_0_closes_unless_kept_alive_and_connection_close_is_honoured() -> None:
    async def test() -> None:
        async with serving(Service()) as listening:
            reader, writer = await connect(listening)
            writer.write(post(b"a", "/now", extra="Connection: keep-alive\r\n", version="1.0"))
            status, headers, body = await read_answer(reader)
            assert (status, body, headers["connection"]) == (200, b"now:a", "keep-alive")
            writer.write(post(b"b", "/now", version="1.0") + post(b"never", "/now"))
            status, headers, body = await read_answer(reader)
            assert (status, body, headers["connection"]) == (200, b"now:b", "close")
            assert await reader.read() == b""
            reader, writer = await connect(listening)
            writer.write(post(b"bye", extra="Connection: close\r\n"))
            status, headers, _ = await read_answer(reader)
            assert status == 200 and headers["connection"] == "close"
            assert await reader.read() == b""

    in_loop(test)


def test_chunked_bodies_and_expect_100_continue() -> None:
    async def test() -> None:
        async with serving(Service()) as listening:
            reader, writer = await connect(listening)
            writer.write(b"POST /now HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
            await asyncio.sleep(0.05)
            writer.write(b"2;ext=1\r\nde\r\n0\r\n\r\n")
            assert (await read_answer(reader))[:3:2] == (200, b"now:abcde")
            writer.write(b"POST /now HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
            assert (
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
            )
            writer.write(b"xyz")
            assert (await read_answer(reader))[:3:2] == (200, b"now:xyz")
            writer.write(b"POST /now HTTP/1.1\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
            status, headers, _ = await read_answer(reader)  # the body is never asked for
            assert status == 413 and headers["connection"] == "close"
            writer.close()
            await still_serves(listening)

    in_loop(test)


# -- hostile inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"POST /now HTTP/1.1\r\nno colon here\r\nContent-Length: 2\r\n\r\nhi", 400),
        (b"POST /now HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST /now HTTP/1.1\r\nContent-Length: 1_0\r\n\r\n0123456789", 400),
        (b"POST /now HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi", 400),
        (b"POST /now HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nhi", 400),
        (b"GET /now HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 400),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\n", 405),
        (b"GET /now HTTP/1.1\r\nX-Big: " + b"a" * (70 * 2**10) + b"\r\n\r\n", 431),
        (b"POST /now HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", 413),
        (b"POST /now HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n7d0\r\n" + b"x" * 2000 + b"\r\n", 413),
    ],
)
def test_hostile_requests_get_their_4xx_and_the_server_lives_on(request_bytes: bytes, status: int) -> None:
    async def test() -> None:
        service = Service()
        async with serving(service) as listening:
            reader, writer = await connect(listening)
            writer.write(request_bytes)
            got, headers, body = await read_answer(reader)
            assert got == status and json.loads(body)["error"]
            assert headers["connection"] == "close" and await reader.read() == b""
            assert service.calls == [] and service.statuses == [status]
            writer.close()
            await still_serves(listening)

    in_loop(test)


def test_a_head_over_64_kib_in_pieces_gets_431() -> None:
    async def test() -> None:
        async with serving(Service()) as listening:
            reader, writer = await connect(listening)
            writer.write(b"GET /now HTTP/1.1\r\nX-Big: " + b"a" * 40_000)
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"a" * 40_000)
            assert (await read_answer(reader))[0] == 431
            writer.close()
            await still_serves(listening)

    in_loop(test)


@pytest.mark.parametrize(
    ("partial", "what"),
    [
        (b"POST /now HTTP/1.1\r\nContent-Le", "head"),
        (b"POST /now HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc", "body"),
    ],
)
def test_a_trickling_client_gets_408_and_loses_the_socket(partial: bytes, what: str) -> None:
    async def test() -> None:
        async with serving(Service()) as listening:
            reader, writer = await connect(listening)
            writer.write(partial)
            status, headers, body = await read_answer(reader)
            assert status == 408 and what in json.loads(body)["error"]
            assert headers["connection"] == "close" and await reader.read() == b""
            await still_serves(listening)

    in_loop(test)


def test_a_big_body_is_refused_with_413_that_clients_sending_it_whole_can_read() -> None:
    """The 413 arrives before the body is sent; the server reads and drops the rest, so a
    client that sends everything before it reads gets the answer, not a connection reset."""
    limits = Limits(max_body_bytes=MiB, body_timeout=5.0)
    big = b"x" * (16 * MiB)

    def with_urllib(url: str) -> tuple[int, str]:
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=big, method="POST"), timeout=10)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())["error"]
        raise AssertionError("no error")

    def with_a_socket(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"POST /now HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    async def test() -> None:
        async with serving(Service(), limits) as listening:
            status, error = await asyncio.to_thread(with_urllib, listening.url + "/now")
            assert status == 413 and f"{MiB} bytes" in error
            answer = await asyncio.to_thread(with_a_socket, listening.port)
            assert answer.startswith(b"HTTP/1.1 413 ") and answer.endswith(b'bytes"}')
            async with (
                aiohttp.ClientSession() as session,
                session.post(listening.url + "/now", data=big) as reply,
            ):
                assert reply.status == 413 and "exceeds" in (await reply.json())["error"]
            await still_serves(listening)

    in_loop(test)


# -- connections over time --------------------------------------------------------------------


def test_an_idle_keep_alive_connection_is_closed_and_a_used_one_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connection, "KEEPALIVE_S", 0.4)

    async def test() -> None:
        async with serving(Service()) as listening:
            idle_reader, _ = await connect(listening)
            reader, writer = await connect(listening)
            loop = asyncio.get_running_loop()
            started = loop.time()
            while loop.time() - started < 0.7:  # past the first check: used 0.1 s before it
                writer.write(post(b"x", "/now"))
                assert (await read_answer(reader))[2] == b"now:x"
                await asyncio.sleep(0.1)
            ended = loop.time()  # the last answer was at most 0.1 s before
            assert await asyncio.wait_for(idle_reader.read(), 1) == b""  # closed at 0.4 s
            assert await asyncio.wait_for(reader.read(), 1) == b""  # idle from now on: closed too
            assert loop.time() - ended >= 0.25  # 0.4 s after its last answer, not at a check before

    in_loop(test)


def test_shutdown_finishes_answers_in_progress_and_closes_idle_connections() -> None:
    async def test() -> None:
        listening = await start_server(Service(delay=0.3).router(), "127.0.0.1", 0, LIMITS)
        busy_reader, busy_writer = await connect(listening)
        idle_reader, _ = await connect(listening)
        busy_writer.write(post(b"late"))
        await asyncio.sleep(0.1)  # the request is in the handler now
        closing = asyncio.create_task(listening.close(2.0))
        assert await asyncio.wait_for(idle_reader.read(), 1) == b""
        status, headers, body = await read_answer(busy_reader)
        assert (status, body) == (200, b"later:late") and headers["connection"] == "close"
        await closing

    in_loop(test)


def test_a_client_gone_mid_answer_breaks_nothing() -> None:
    async def test() -> None:
        service = Service(delay=0.1)
        async with serving(service) as listening:
            _, writer = await connect(listening)
            writer.write(post(b"gone"))
            await asyncio.sleep(0.02)
            writer.transport.abort()
            await asyncio.sleep(0.15)
            assert service.calls == [b"gone"] and service.statuses == [200]  # carried out, dropped
            await still_serves(listening)

    in_loop(test)


def test_serve_prints_the_ready_line_drains_on_sigterm_and_refuses_a_taken_port(
    capsys: pytest.CaptureFixture[str],
) -> None:
    drained: list[bool] = []

    async def test() -> None:
        serving_task = asyncio.create_task(
            serve(Service().router(), "127.0.0.1", 0, draining=lambda: drained.append(True))
        )
        for _ in range(100):
            await asyncio.sleep(0.01)
            if "ready on" in capsys.readouterr().out:
                break
        else:
            raise AssertionError("no ready line")
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving_task, 5)
        assert drained == [True]
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            with pytest.raises(ListenError, match="pick another --port"):
                await serve(Service().router(), "127.0.0.1", taken.getsockname()[1])

    in_loop(test)
