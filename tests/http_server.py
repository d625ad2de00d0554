"""A tiny local HTTP file server for tests that download things.

Serves a dict ``{url_path: bytes}`` and/or a directory on ``127.0.0.1`` with an
ephemeral port, from a background thread. It speaks just enough HTTP to test a
downloader honestly:

- ``GET`` and ``HEAD``; ``404`` for unknown paths;
- ``Range: bytes=N-`` (and ``bytes=N-M``): ``206`` with ``Content-Range``, or ``416``
  when ``N`` is past the end; a route can also ignore ``Range`` and answer ``200``;
- per-route extra headers (e.g. ``X-Linked-Etag``, ``X-Linked-Size``), a forced status
  (e.g. ``403``) and a redirect (``302`` to another path or URL);
- a response cut off mid-body (``cut_after`` bytes, then the socket closes) to
  simulate an interrupted download, for the first ``cut_times`` requests;
- a log of every request (method, path, ``Range`` header, all headers).

Usage::

    with FileServer({"/a.txt": b"hello"}) as server:
        urllib.request.urlopen(server.url_for("/a.txt")).read()
        assert server.requests[0].range is None

or the ``file_server`` fixture (import it into a test module). Never binds to
anything but the loopback interface.
"""
from __future__ import annotations

import os
import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Mapping

import pytest


@dataclass
class Route:
    """How one URL path is answered."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers
    status: int = 200  # a non-2xx status (e.g. 403) is sent as-is, with `body`
    ranges: bool = True  # honour `Range`; False answers 200 with the whole body
    redirect: str | None = None  # answer 302 to this path or absolute URL
    cut_after: int | None = None  # send only this many body bytes, then close
    cut_times: int = 1  # how many responses are cut before serving normally


@dataclass(frozen=True)
class RequestRecord:
    """One request the server received."""

    method: str
    path: str  # unquoted, without the query string
    range: str | None  # the raw `Range` header, if any
    headers: dict[str, str]


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then closed): connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FileServer:
    """A threaded HTTP server on 127.0.0.1 serving routes and/or a directory.

    Args:
        files: ``{url_path: bytes}`` routes, or a directory whose files are served
            under ``/<relative path>``.
    """

    def __init__(self, files: Mapping[str, bytes] | str | os.PathLike | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.root: Path | None = None
        self._requests: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        if isinstance(files, Mapping):
            for path, body in files.items():
                self.add(path, body)
        elif files is not None:
            self.root = Path(files).resolve()

    # -- routes -------------------------------------------------------------

    def add(self, path: str, body: bytes = b"", **options) -> Route:
        """Serve ``body`` at ``path``; ``options`` are the other `Route` fields."""
        route = Route(body=bytes(body), **options)
        self.routes[_norm(path)] = route
        return route

    def remove(self, path: str) -> None:
        """Stop serving ``path`` (it answers 404 afterwards)."""
        self.routes.pop(_norm(path), None)

    # -- request log ----------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the requests received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # -- lifecycle ------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321`` (no trailing slash)."""
        if self._httpd is None:
            raise RuntimeError("the server is not running; use `with FileServer(...) as server:`")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url_for(self, path: str) -> str:
        return self.url + urllib.parse.quote(_norm(path))

    def start(self) -> "FileServer":
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.owner = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- used by the handler --------------------------------------------------

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)

    def _lookup(self, path: str, headers: Mapping[str, str] | None = None) -> Route | None:
        """The route for a request (a subclass may answer from the request headers too)."""
        route = self.routes.get(path)
        if route is not None or self.root is None:
            return route
        target = (self.root / path.lstrip("/")).resolve()
        if target.is_file() and target.is_relative_to(self.root):
            return Route(body=target.read_bytes())
        return None

    def _take_cut(self, route: Route) -> int | None:
        """The number of body bytes to send if this response is to be cut, else None."""
        with self._lock:
            if route.cut_after is None or route.cut_times <= 0:
                return None
            route.cut_times -= 1
            return route.cut_after


def _norm(path: str) -> str:
    return "/" + path.lstrip("/")


_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    timeout = 10  # seconds a connection may sit idle: never hang a test
    server_version = "smollm-test"

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass

    def _serve(self, send_body: bool) -> None:
        owner: FileServer = self.server.owner  # type: ignore[attr-defined]
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        range_header = self.headers.get("Range")
        owner._record(RequestRecord(self.command, path, range_header, dict(self.headers.items())))

        route = owner._lookup(path, self.headers)
        if route is None:
            return self._reply(404, b"not found", {}, send_body)
        if route.redirect is not None:
            return self._reply(302, b"", {**route.headers, "Location": route.redirect}, send_body)
        if route.status != 200:
            return self._reply(route.status, route.body, route.headers, send_body)

        body, status, headers = route.body, 200, dict(route.headers)
        match = _RANGE.match(range_header or "") if route.ranges else None
        if match:
            size = len(body)
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if start >= size or end < start:
                return self._reply(416, b"", {"Content-Range": f"bytes */{size}"}, send_body)
            body, status = body[start : end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        cut = owner._take_cut(route) if send_body else None
        self._reply(status, body, headers, send_body, cut=cut)

    def _reply(
        self, status: int, body: bytes, headers: Mapping[str, str], send_body: bool, cut: int | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        self.close_connection = True  # HTTP/1.0: the socket closes after each response


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    """An empty running `FileServer`; add routes with ``file_server.add(path, bytes)``."""
    with FileServer() as server:
        yield server
