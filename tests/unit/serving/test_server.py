"""The front door: fast routes answered by the lean path, everything else handed to aiohttp.

Each test starts a real listener on loopback, on uvloop where installed (as the servers run),
and speaks raw HTTP/1.1 to it, so what is checked is the bytes a client sees.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping

import pytest
from aiohttp import web

from collage_inference.errors import ProtocolError
from collage_inference.serving import server
from collage_inference.serving.http import run, server_middlewares
from collage_inference.serving.protocol import Limits
from collage_inference.serving.server import FastRoutes, FrontDoor

LIMITS = Limits(max_body_bytes=1000, body_timeout=0.3)
Answer = tuple[int, dict[str, str], bytes]


class Door:
    """A front door on a free port, with a fast ``/fast`` and an aiohttp app behind it."""

    def __init__(self, token: str | None = None, handler_delay: float = 0.0) -> None:
        self.token = token
        self.handler_delay = handler_delay
        self.fast_calls: list[bytes] = []
        self.statuses: list[int] = []

    async def fast(self, body: bytes, headers: Mapping[str, str]) -> tuple[bytes, dict[str, str]]:
        self.fast_calls.append(body)
        await asyncio.sleep(self.handler_delay)
        if body == b"bad":
            raise ProtocolError("that body is bad; send a good one")
        if body == b"crash":
            raise RuntimeError("a bug with a secret in it")
        return b"fast:" + body, {"Content-Type": "text/plain", "X-Seen": headers.get("x-tag", "")}

    def at_once(self, body: bytes, headers: Mapping[str, str]) -> tuple[bytes, dict[str, str]]:
        """A handler that answers without awaiting (as a worker does when it computes inline)."""
        self.fast_calls.append(body)
        if body == b"bad":
            raise ProtocolError("that body is bad; send a good one")
        return b"now:" + body, {"Content-Type": "text/plain"}

    async def __aenter__(self) -> Door:
        async def slow(request: web.Request) -> web.Response:
            return web.Response(text="aiohttp:" + (await request.text()))

        app = web.Application(middlewares=server_middlewares(self.token))
        app.router.add_post("/fast", slow)
        app.router.add_get("/other", slow)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        handlers = {"/fast": self.fast, "/now": self.at_once}
        routes = FastRoutes(handlers, LIMITS, self.token, self.statuses.append)
        self.door = FrontDoor(self.runner.server, routes)
        self.listener = await asyncio.get_running_loop().create_server(self.door, "127.0.0.1", 0)
        self.port = self.listener.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.listener.close()
        await self.door.shutdown(1.0)
        await self.runner.cleanup()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


def post(body: bytes, path: str = "/fast", extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0)))
    return int(lines[0].split(" ")[1]), headers, body


def in_loop(test: Callable[[], Awaitable[None]]) -> None:
    run(asyncio.wait_for(test(), 20))


def test_a_fast_route_is_answered_by_the_front_door_with_keep_alive() -> None:
    async def test() -> None:
        async with Door() as door:
            reader, writer = await door.connect()
            for i in range(3):
                writer.write(post(f"n{i}".encode(), extra="X-Tag: t\r\n"))
                status, headers, body = await read_answer(reader)
                assert (status, body, headers["x-seen"]) == (200, f"fast:n{i}".encode(), "t")
                assert headers["content-type"] == "text/plain" and "date" in headers
            assert door.fast_calls == [b"n0", b"n1", b"n2"] and door.statuses == [200] * 3
            writer.close()

    in_loop(test)


def test_pipelined_requests_are_answered_in_order_once_each() -> None:
    async def test() -> None:
        async with Door(handler_delay=0.01) as door:
            reader, writer = await door.connect()
            writer.write(b"".join(post(f"p{i}".encode()) for i in range(5)))
            bodies = [(await read_answer(reader))[2] for _ in range(5)]
            assert bodies == [f"fast:p{i}".encode() for i in range(5)]
            assert len(door.fast_calls) == 5
            writer.close()

    in_loop(test)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n",  # another method and path
        b"POST /fast HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        b"POST /fast HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi",
        b"POST /fast?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
    ],
)
def test_anything_else_is_handed_to_aiohttp_with_the_bytes_read(request_bytes: bytes) -> None:
    async def test() -> None:
        async with Door() as door:
            reader, writer = await door.connect()
            writer.write(post(b"first"))  # served by the front door first, on the same connection
            assert (await read_answer(reader))[2] == b"fast:first"
            writer.write(request_bytes)
            status, _, body = await read_answer(reader)
            assert status == 200 and body.startswith(b"aiohttp:"), body
            assert door.fast_calls == [b"first"]
            writer.close()

    in_loop(test)


def test_a_malformed_or_ambiguous_head_gets_aiohttps_400() -> None:
    async def test() -> None:
        async with Door() as door:
            for head in (
                b"POST /fast HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nhi",
                b"POST /fast HTTP/1.1\r\nno colon here\r\nContent-Length: 2\r\n\r\nhi",
            ):
                reader, writer = await door.connect()
                writer.write(head)
                assert (await read_answer(reader))[0] == 400
                writer.close()
            assert door.fast_calls == []

    in_loop(test)


def test_errors_are_json_with_the_shared_mapping() -> None:
    async def test() -> None:
        async with Door() as door:
            reader, writer = await door.connect()
            writer.write(post(b"bad"))
            status, headers, body = await read_answer(reader)
            assert status == 400 and "send a good one" in json.loads(body)["error"]
            assert headers["content-type"].startswith("application/json")
            writer.write(post(b"crash"))  # the connection survives a handler's bug
            status, _, body = await read_answer(reader)
            assert status == 500 and "secret" not in body.decode()
            writer.write(post(b"ok"))
            assert (await read_answer(reader))[:1] == (200,)
            assert door.statuses == [400, 500, 200]
            writer.close()

    in_loop(test)


def test_the_token_guards_the_fast_route() -> None:
    async def test() -> None:
        async with Door(token="s3cret") as door:
            reader, writer = await door.connect()
            writer.write(post(b"x", extra="Authorization: Bearer wrong\r\n"))
            status, headers, _ = await read_answer(reader)
            assert status == 401 and headers["www-authenticate"].startswith("Bearer")
            writer.write(post(b"x", extra="Authorization: Bearer s3cret\r\n"))
            assert (await read_answer(reader))[2] == b"fast:x"
            assert door.fast_calls == [b"x"]  # the refused request never reached the handler
            writer.close()

    in_loop(test)


def test_a_repeated_head_is_parsed_once_and_still_checked_every_time() -> None:
    async def test() -> None:
        async with Door(token="s3cret") as door:
            reader, writer = await door.connect()
            for body in (b"a", b"b", b"c"):  # one length: byte-identical heads
                writer.write(post(body, extra="Authorization: Bearer s3cret\r\nX-Tag: t\r\n"))
                status, headers, answer = await read_answer(reader)
                assert (status, answer, headers["x-seen"]) == (200, b"fast:" + body, "t")
            assert len(door.door.heads) == 1
            writer.write(post(b"d", extra="Authorization: Bearer wrong\r\nX-Tag: t\r\n"))
            assert (await read_answer(reader))[0] == 401
            writer.write(post(b"e", extra="Authorization: Bearer s3cret\r\nX-Tag: t\r\n"))
            assert (await read_answer(reader))[2] == b"fast:e"  # the token is checked every time
            assert door.fast_calls == [b"a", b"b", b"c", b"e"]
            writer.close()

    in_loop(test)


def test_an_oversized_body_is_refused_before_it_is_read() -> None:
    async def test() -> None:
        async with Door() as door:
            reader, writer = await door.connect()
            writer.write(b"POST /fast HTTP/1.1\r\nContent-Length: 5000\r\n\r\n")
            status, headers, body = await read_answer(reader)
            assert status == 413 and "1000 bytes" in json.loads(body)["error"]
            assert headers["connection"] == "close" and await reader.read() == b""
            assert door.fast_calls == []

    in_loop(test)


@pytest.mark.parametrize(
    ("partial", "what"),
    [
        (b"POST /fast HTTP/1.1\r\nContent-Le", "head"),
        (b"POST /fast HTTP/1.1\r\nContent-Length: 9\r\n\r\nabc", "body"),
    ],
)
def test_a_trickling_client_gets_408_and_loses_the_socket(partial: bytes, what: str) -> None:
    async def test() -> None:
        async with Door() as door:
            reader, writer = await door.connect()
            writer.write(partial)
            status, _, body = await read_answer(reader)
            assert status == 408 and what in json.loads(body)["error"]
            assert await reader.read() == b""

    in_loop(test)


def test_an_idle_keep_alive_connection_is_closed_and_a_used_one_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server, "KEEPALIVE_S", 0.4)

    async def test() -> None:
        async with Door() as door:
            idle_reader, _ = await door.connect()
            reader, writer = await door.connect()
            loop = asyncio.get_running_loop()
            started = loop.time()
            while loop.time() - started < 0.7:  # past the first check: used 0.1 s before it
                writer.write(post(b"x"))
                assert (await read_answer(reader))[2] == b"fast:x"
                await asyncio.sleep(0.1)
            ended = loop.time()  # the last answer was at most 0.1 s before
            assert await asyncio.wait_for(idle_reader.read(), 1) == b""  # closed at 0.4 s
            assert await asyncio.wait_for(reader.read(), 1) == b""  # idle from now on: closed too
            assert loop.time() - ended >= 0.25  # 0.4 s after its last answer, not at a check before

    in_loop(test)


def test_connection_close_is_honoured_after_the_answer() -> None:
    async def test() -> None:
        async with Door() as door:
            reader, writer = await door.connect()
            writer.write(post(b"bye", extra="Connection: close\r\n"))
            status, headers, _ = await read_answer(reader)
            assert status == 200 and headers["connection"] == "close"
            assert await reader.read() == b""

    in_loop(test)


def test_shutdown_finishes_answers_in_progress_and_closes_idle_connections() -> None:
    async def test() -> None:
        async with Door(handler_delay=0.3) as door:
            busy_reader, busy_writer = await door.connect()
            idle_reader, _ = await door.connect()
            busy_writer.write(post(b"late"))
            await asyncio.sleep(0.1)  # the request is in the handler now
            door.listener.close()
            shutdown = asyncio.create_task(door.door.shutdown(2.0))
            assert await asyncio.wait_for(idle_reader.read(), 1) == b""
            status, headers, body = await read_answer(busy_reader)
            assert (status, body) == (200, b"fast:late") and headers["connection"] == "close"
            await shutdown

    in_loop(test)


def test_handlers_that_answer_at_once_serve_a_long_pipeline_in_order() -> None:
    async def test() -> None:
        async with Door() as door:
            reader, writer = await door.connect()
            count = 3000  # answered in one loop, not one nested call per request
            writer.write(b"".join(post(str(i).encode(), "/now") for i in range(count)) + post(b"bad", "/now"))
            bodies = [(await read_answer(reader))[2] for _ in range(count)]
            assert bodies == [f"now:{i}".encode() for i in range(count)]
            status, _, body = await read_answer(reader)
            assert status == 400 and "good one" in json.loads(body)["error"]
            writer.write(post(b"mixed") + post(b"again", "/now"))  # a later answer, then an at-once one
            assert [(await read_answer(reader))[2] for _ in range(2)] == [b"fast:mixed", b"now:again"]
            writer.close()

    in_loop(test)
