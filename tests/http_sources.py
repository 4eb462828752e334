"""A tiny HTTP server for tests of image sources: fixed routes, and a log of every request
it received (the proof that a refused URI was never fetched)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RecordingServer:
    """Serves ``routes`` (path -> (status, headers, body)) on ``host``; ``log`` lists the
    paths requested, in order."""

    def __init__(self, host: str = "127.0.0.1"):
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.log: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.log.append(self.path)
                status, headers, body = server.routes.get(self.path, (404, {}, b"not found"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # quiet test output
                pass

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.host, self.port = self.httpd.server_address[:2]

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def redirect(self, path: str, to: str, status: int = 302) -> str:
        self.routes[path] = (status, {"Location": to}, b"")
        return self.url(path)

    def serve(self, path: str, body: bytes, content_type: str = "image/png") -> str:
        self.routes[path] = (200, {"Content-Type": content_type}, body)
        return self.url(path)


@contextmanager
def recording_server(host: str = "127.0.0.1") -> Iterator[RecordingServer]:
    server = RecordingServer(host)
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
