"""The lean HTTP/1.1 client against scripted servers on loopback: keep-alive reuse, chunked
bodies, answers split across packets, stale keep-alive connections, garbage and timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from collage_inference.errors import ProtocolError
from collage_inference.serving.wire import HttpClient

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def with_server(script: Script, test: Callable[[str], Awaitable[None]]) -> None:
    server = await asyncio.start_server(script, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await test(f"http://127.0.0.1:{port}")
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


def answering(requests: list[bytes], answer: Callable[[int], bytes]) -> Script:
    """A server that reads each request of a connection into ``requests`` and answers it with
    ``answer(len(requests))``, until the client closes the connection."""

    async def script(reader, writer):
        while True:
            try:
                requests.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(answer(len(requests)))
            await writer.drain()

    return script


def test_keep_alive_reuses_one_connection_and_sends_one_write() -> None:
    connections, requests = [], []

    async def script(reader, writer):
        connections.append(writer)
        while True:
            try:
                requests.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Thing: a:b\r\n\r\nhel")
            await writer.drain()
            await asyncio.sleep(0.01)  # the rest in a second packet
            writer.write(b"lo")

    async def test(url):
        client = HttpClient(url)
        for i in range(3):
            reply = await client.post("/p", f"body{i}".encode(), {"Content-Type": "x/y"}, 5.0)
            assert (reply.status, reply.body, reply.headers["x-thing"]) == (200, b"hello", "a:b")
        client.close()

    asyncio.run(with_server(script, test))
    assert len(connections) == 1 and len(requests) == 3
    assert requests[2].startswith(b"POST /p HTTP/1.1\r\n") and requests[2].endswith(b"\r\n\r\nbody2")
    assert b"Content-Length: 5" in requests[0] and b"Content-Type: x/y" in requests[0]


def test_a_repeated_answer_head_is_parsed_once_per_origin() -> None:
    requests: list[bytes] = []

    def answer(n: int) -> bytes:
        body = b"x" * (1 + n % 2)  # two lengths: two heads
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-A: b\r\n\r\n" % len(body) + body

    async def test(url):
        client = HttpClient(url)
        replies = [await client.post("/p", b"q", {"X-T": "1"}, 5.0) for _ in range(4)]
        assert [r.body for r in replies] == [b"xx", b"x", b"xx", b"x"]
        assert all(r.headers["x-a"] == "b" for r in replies)
        assert len(client._heads) == 2  # the cache is what is tested
        with pytest.raises(TypeError):
            replies[0].headers["x-a"] = "changed"  # shared by every answer with that head
        head = client.post_head("/p", {"X-T": "1"}, 1)
        assert (await client.send(head + b"q", 5.0)).body == b"xx"
        client.close()

    asyncio.run(with_server(answering(requests, answer), test))
    assert len(set(requests)) == 1  # send() with post_head() writes what post() writes


def test_chunked_answers_and_connection_close() -> None:
    connections = []

    async def script(reader, writer):
        connections.append(writer)
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    async def test(url):
        client = HttpClient(url)
        for _ in range(2):
            reply = await client.post("/", b"", {}, 5.0)
            assert (reply.status, reply.body) == (404, b"wikipedia")

    asyncio.run(with_server(script, test))
    assert len(connections) == 2  # "Connection: close" was honoured


def test_a_stale_keep_alive_connection_is_retried_once_on_a_new_one() -> None:
    served = []

    async def script(reader, writer):
        await read_request(reader)
        served.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        if len(served) == 1:
            await reader.read(1)  # the next request arrives ... and the server drops it unanswered
            writer.transport.abort()

    async def test(url):
        client = HttpClient(url)
        assert (await client.post("/", b"a", {}, 5.0)).body == b"ok"
        assert (await client.post("/", b"b", {}, 5.0)).body == b"ok"

    asyncio.run(with_server(script, test))
    assert len(served) == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"SPAM\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200\r\nContent-Length: 1_0\r\n\r\n0123456789",
    ],
)
def test_garbage_answers_are_protocol_errors(answer: bytes) -> None:
    async def script(reader, writer):
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async def test(url):
        with pytest.raises(ProtocolError):
            await HttpClient(url).post("/", b"", {}, 5.0)

    asyncio.run(with_server(script, test))


def test_silence_times_out_and_a_closed_port_is_an_os_error() -> None:
    async def script(reader, writer):
        await read_request(reader)
        await asyncio.sleep(5)

    async def test(url):
        with pytest.raises(TimeoutError):
            await HttpClient(url).post("/", b"", {}, 0.2)
        with pytest.raises(OSError):
            await HttpClient("http://127.0.0.1:9").post("/", b"", {}, 2.0)

    asyncio.run(with_server(script, test))


def test_against_a_real_aiohttp_server() -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read() + request.headers["Authorization"].encode())

    async def run() -> None:
        app = web.Application()
        app.router.add_post("/v2/echo", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        client = HttpClient(f"http://127.0.0.1:{port}")
        try:
            replies = await asyncio.gather(
                *(client.post("/v2/echo", b"x" * i, {"Authorization": "t"}, 5.0) for i in range(20))
            )
            assert [r.body for r in replies] == [b"x" * i + b"t" for i in range(20)]
        finally:
            client.close()
            await runner.cleanup()

    asyncio.run(run())


def test_on_an_idle_connection_the_request_is_written_before_post_returns() -> None:
    requests: list[bytes] = []
    script = answering(requests, lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def test(url):
        client = HttpClient(url)
        await client.post("/p", b"first", {}, 5.0)  # opens the keep-alive connection
        pending = client.post("/p", b"second", {}, 5.0)  # written now, awaited later
        for _ in range(100):
            if len(requests) == 2:
                break
            await asyncio.sleep(0.01)  # only the server runs meanwhile
        assert len(requests) == 2 and requests[1].endswith(b"second")
        assert (await pending).body == b"ok"
        client.close()

    asyncio.run(with_server(script, test))
