"""``download_inception`` against a local HTTP server: a matching hash is written (and a second call downloads
nothing), a wrong hash leaves nothing in the destination's directory, an unreachable server or an HTTP error is one
line naming the URL."""

from __future__ import annotations

import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from gancleanse.errors import GancleanseError
from gancleanse.features.weights import PYTORCH_FID_NAME, download_inception

CONTENT = bytes(range(256)) * 5000  # 1.28 MB: more than one streamed chunk
CONTENT_SHA256 = hashlib.sha256(CONTENT).hexdigest()


class Server:
    """A server on 127.0.0.1 (a free port) that serves CONTENT at /weights.pth, 404 elsewhere, and counts requests."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                server.requests.append(self.path)
                if self.path != "/weights.pth":
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(CONTENT)))
                self.end_headers()
                self.wfile.write(CONTENT)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib would send even 127.0.0.1 through a proxy named in the environment."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_right_hash_is_written_once(server, tmp_path):
    destination = tmp_path / "cache" / "inception.pth"
    url = f"{server.url}/weights.pth"
    assert download_inception(destination, url=url, sha256=CONTENT_SHA256) == destination
    assert destination.read_bytes() == CONTENT and len(server.requests) == 1
    assert download_inception(destination, url=url, sha256=CONTENT_SHA256) == destination
    assert len(server.requests) == 1  # already there with the right hash: nothing downloaded
    assert sorted(p.name for p in destination.parent.iterdir()) == ["inception.pth"]


def test_a_directory_destination_gets_the_published_name(server, tmp_path):
    found = download_inception(tmp_path, url=f"{server.url}/weights.pth", sha256=CONTENT_SHA256.upper())
    assert found == tmp_path / PYTORCH_FID_NAME and found.read_bytes() == CONTENT


def test_a_stale_file_is_replaced(server, tmp_path):
    destination = tmp_path / "inception.pth"
    destination.write_bytes(b"an interrupted copy")
    download_inception(destination, url=f"{server.url}/weights.pth", sha256=CONTENT_SHA256)
    assert destination.read_bytes() == CONTENT and len(server.requests) == 1


def test_wrong_hash_writes_nothing(server, tmp_path):
    wrong = hashlib.sha256(b"other bytes").hexdigest()
    with pytest.raises(GancleanseError) as info:
        download_inception(tmp_path / "inception.pth", url=f"{server.url}/weights.pth", sha256=wrong)
    message = str(info.value)
    assert "\n" not in message and CONTENT_SHA256 in message and wrong in message and server.url in message
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary file is left


def test_unreachable_and_http_errors_are_one_line(server, tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/weights.pth"
    with pytest.raises(GancleanseError) as info:
        download_inception(tmp_path / "a.pth", url=url, sha256=CONTENT_SHA256, timeout=5)
    assert "\n" not in str(info.value) and url in str(info.value) and "refused" in str(info.value).lower()
    missing = f"{server.url}/absent.pth"
    with pytest.raises(GancleanseError) as info:
        download_inception(tmp_path / "b.pth", url=missing, sha256=CONTENT_SHA256)
    assert "\n" not in str(info.value) and missing in str(info.value) and "HTTP 404" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_malformed_hash_is_refused(tmp_path):
    with pytest.raises(GancleanseError, match="64 hex digits"):
        download_inception(tmp_path / "a.pth", url="http://127.0.0.1:9/x", sha256="6726825d")
    assert not Path(tmp_path / "a.pth").exists()
