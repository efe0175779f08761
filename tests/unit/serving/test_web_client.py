"""The HTTP client against scripted servers on loopback (keep-alive reuse, chunked and
until-close bodies, answers split across packets, stale keep-alive connections, garbage,
timeouts) and against the project's own server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from collage_inference.errors import ConfigError, ProtocolError
from collage_inference.serving.web.client import HttpClient
from collage_inference.serving.web.routes import Request, Response, Route, Router, run
from collage_inference.serving.web.server import start_server

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def with_server(script: Script, test: Callable[[str], Awaitable[None]]) -> None:
    async def main() -> None:
        server = await asyncio.start_server(script, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await asyncio.wait_for(test(f"http://127.0.0.1:{port}"), 10)
        finally:
            server.close()

    run(main())


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


def answering(
    requests: list[bytes], answer: Callable[[int], bytes], connections: list | None = None
) -> Script:
    """A server that reads each request of a connection into ``requests`` and answers it with
    ``answer(len(requests))``, until the client closes the connection."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if connections is not None:
            connections.append(writer)
        while True:
            try:
                requests.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(answer(len(requests)))
            await writer.drain()

    return script


def test_keep_alive_reuses_one_connection_and_sends_one_request_per_write() -> None:
    connections: list = []
    requests: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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

    async def test(url: str) -> None:
        client = HttpClient(url + "/base/")
        for i in range(3):
            reply = await client.request("POST", "/p", f"body{i}".encode(), {"Content-Type": "x/y"})
            assert (reply.status, reply.body, reply.headers["x-thing"]) == (200, b"hello", "a:b")
        head = client.head("POST", "/p", {"Content-Type": "x/y"}, 5)
        assert (await client.send(head + b"body3", 5.0)).body == b"hello"
        client.close()

    with_server(script, test)
    assert len(connections) == 1 and len(requests) == 4
    assert requests[2].startswith(b"POST /base/p HTTP/1.1\r\n") and requests[2].endswith(b"\r\n\r\nbody2")
    assert b"Content-Length: 5" in requests[0] and b"Content-Type: x/y" in requests[0]
    assert requests[3] == requests[2].replace(b"body2", b"body3")  # send(head() + body) == request()


def test_chunked_and_until_close_answers_and_connection_close() -> None:
    connections: list = []
    answers = [
        b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
    ]

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await read_request(reader)
        writer.write(answers[(len(connections) - 1) % 2])
        await writer.drain()
        writer.close()

    async def test(url: str) -> None:
        client = HttpClient(url)
        for _ in range(2):
            reply = await client.request("GET", "/")
            assert (reply.status, reply.body) == (404, b"wikipedia")
            reply = await client.request("GET", "/")
            assert (reply.status, reply.body) == (200, b"until the end")

    with_server(script, test)
    assert len(connections) == 4  # no answer's connection was kept


def test_a_stale_keep_alive_connection_is_retried_once_on_a_new_one() -> None:
    served: list[int] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        served.append(1)
        writer.write(OK)
        await writer.drain()
        if len(served) == 1:
            await reader.read(1)  # the next request arrives ... and the server drops it unanswered
            writer.transport.abort()

    async def test(url: str) -> None:
        client = HttpClient(url)
        assert (await client.request("POST", "/", b"a")).body == b"ok"
        assert (await client.request("POST", "/", b"b")).body == b"ok"

    with_server(script, test)
    assert len(served) == 2


def test_an_idle_connection_the_server_closed_is_not_used() -> None:
    connections: list = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        writer.close()  # without saying so: an idle keep-alive connection closed by the server

    async def test(url: str) -> None:
        client = HttpClient(url)
        assert (await client.request("GET", "/")).body == b"ok"
        await asyncio.sleep(0.05)
        assert (await client.request("GET", "/")).body == b"ok"

    with_server(script, test)
    assert len(connections) == 2


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
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async def test(url: str) -> None:
        with pytest.raises(ProtocolError):
            await HttpClient(url).request("POST", "/")

    with_server(script, test)


def test_an_answer_nobody_asked_for_retires_the_connection() -> None:
    connections: list = []
    requests: list[bytes] = []
    script = answering(requests, lambda n: OK + OK if n == 1 else OK, connections)

    async def test(url: str) -> None:
        client = HttpClient(url)
        assert (await client.request("GET", "/")).body == b"ok"
        assert (await client.request("GET", "/")).body == b"ok"

    with_server(script, test)
    assert len(connections) == 2 and len(requests) == 2


def test_a_reply_that_is_not_json_is_a_protocol_error() -> None:
    async def test(url: str) -> None:
        reply = await HttpClient(url).request("GET", "/")
        with pytest.raises(ProtocolError, match="not JSON"):
            reply.json()

    with_server(answering([], lambda _: OK), test)


def test_silence_times_out_and_a_closed_port_is_an_os_error() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def test(url: str) -> None:
        with pytest.raises(TimeoutError):
            await HttpClient(url).request("POST", "/", timeout=0.2)
        with pytest.raises(OSError):
            await HttpClient("http://127.0.0.1:9").request("POST", "/", timeout=2.0)

    with_server(script, test)


def test_on_an_idle_connection_the_request_is_written_before_it_is_awaited() -> None:
    requests: list[bytes] = []

    async def test(url: str) -> None:
        client = HttpClient(url)
        await client.request("POST", "/p", b"first")  # opens the keep-alive connection
        pending = client.request("POST", "/p", b"second")  # written now, awaited later
        for _ in range(100):
            if len(requests) == 2:
                break
            await asyncio.sleep(0.01)  # only the server runs meanwhile
        assert len(requests) == 2 and requests[1].endswith(b"second")
        assert (await pending).body == b"ok"
        client.close()

    with_server(answering(requests, lambda _: OK), test)


def test_a_cancelled_exchange_closes_its_connection() -> None:
    connections: list = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await read_request(reader)
        await asyncio.sleep(0.2)
        writer.write(OK)

    async def test(url: str) -> None:
        client = HttpClient(url)
        task = asyncio.ensure_future(client.request("GET", "/"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await client.request("GET", "/")).body == b"ok"

    with_server(script, test)
    assert len(connections) == 2


def test_urls_other_than_http_are_refused() -> None:
    for url in ("ftp://host/", "http://", "host:80", "http://h:99999", "http://h/?q=1"):
        with pytest.raises(ConfigError):
            HttpClient(url)


def test_against_the_projects_own_server() -> None:
    async def echo(request: Request) -> Response:
        return Response(request.body + request.headers["authorization"].encode())

    async def main() -> None:
        router = Router(
            [Route("POST", "/v2/echo", echo), Route("GET", "/doc", lambda _: Response.json({"a": 1}))]
        )
        listening = await start_server(router, "127.0.0.1", 0)
        client = HttpClient(listening.url)
        try:
            replies = await asyncio.gather(
                *(client.request("POST", "/v2/echo", b"x" * i, {"Authorization": "t"}) for i in range(20))
            )
            assert [r.body for r in replies] == [b"x" * i + b"t" for i in range(20)]
            assert (await client.request("GET", "/doc")).json() == {"a": 1}
            head = await client.request("HEAD", "/doc")
            assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "7")
            assert (await client.request("GET", "/doc")).json() == {"a": 1}  # after a HEAD, too
        finally:
            client.close()
            await listening.close(1.0)

    run(asyncio.wait_for(main(), 10))
