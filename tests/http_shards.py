"""A loopback HTTP server for shard folders (the standard library's http.server, in a thread), with
the faults remote storage has at scale, chosen by the first path segment:

    /files/<path>   the file as it is
    /cut/<path>     promises the whole file (Content-Length) and closes the connection halfway
    /stall/<path>   sends half of the file, then nothing until the server stops
"""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, release: threading.Event, **kwargs):
        self.release = release
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        mode, _, rest = self.path.lstrip("/").partition("/")
        if mode == "files":
            self.path = "/" + rest
            return super().do_GET()
        path = Path(self.directory) / rest
        if mode not in ("cut", "stall") or not path.is_file():
            return self.send_error(404)
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        if mode == "stall":
            self.release.wait()  # until the server stops: the client must give up by itself
        self.close_connection = True


class ShardServer:
    """`with ShardServer(root) as server: server.url("files", "train-000000.tar")`."""

    def __init__(self, root: Path):
        self.release = threading.Event()
        handler = functools.partial(_Handler, directory=str(root), release=self.release)
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, mode: str = "files", path: str = "") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{mode}/{path}".rstrip("/")

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
