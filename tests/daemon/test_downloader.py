"""The model downloader against a real HTTP server on 127.0.0.1 that can drop connections."""
from __future__ import annotations

import hashlib
import io
import json
import random
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from worker.downloader import DownloadError, download, local_manifest
from worker.engine.gguf_file import default_model_path

SIZE = 3 * 2**20 + 12345
DATA = random.Random(4).randbytes(SIZE)


class FileServer:
    """Serves ``files`` (path -> bytes) over HTTP/1.1 with ``Range: bytes=N-`` support.

    ``drops[path]`` lists, for the next responses for ``path`` in order, how many body
    bytes to send before closing the socket; ``ignore_range`` answers every request with the whole file (200).
    ``requests`` records (path, Range header) and ``dropped_at`` the file offset of each drop.
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.drops: dict[str, list[int]] = {}
        self.ignore_range = False
        self.requests: list[tuple[str, str | None]] = []
        self.dropped_at: list[int] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = unquote(urlsplit(self.path).path).lstrip("/")
                rng = self.headers.get("Range")
                state.requests.append((path, rng))
                body = state.files.get(path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng and not state.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if state.drops.get(path):
                    n = min(state.drops[path].pop(0), len(payload))
                    self.wfile.write(payload[:n])
                    state.dropped_at.append(start + n)
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def file_requests(self, name: str) -> list[str | None]:
        """Range headers of the requests for ``name``, in order."""
        return [rng for path, rng in self.requests if path == name]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def manifest(*entries: tuple[str, bytes], **extra) -> bytes:
    files = [{"name": name, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()} for name, body in entries]
    return json.dumps({"files": files, **extra}).encode()


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    """Only 127.0.0.1: no proxy from the environment may see the test traffic."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server():
    s = FileServer({"model.bin": DATA, "manifest.json": manifest(("model.bin", DATA))})
    yield s
    s.close()


def fast(**kw):
    return {"retries": 3, "timeout_s": 5, "backoff_s": 0, **kw}


def test_download_resumes_after_dropped_connections_and_verifies(server, tmp_path):
    server.drops = {"model.bin": [1_000_000, 700_000]}
    seen = []
    paths = download(server.url + "manifest.json", tmp_path, progress=lambda *a: seen.append(a), **fast())
    assert paths == [tmp_path / "model.bin"]
    assert paths[0].read_bytes() == DATA
    assert server.dropped_at == [1_000_000, 1_700_000]
    assert server.file_requests("model.bin") == [None, "bytes=1000000-", "bytes=1700000-"]
    assert not (tmp_path / "model.bin.partial").exists()
    done = [d for name, d, total in seen if name == "model.bin"]
    assert done == sorted(done) and seen[-1] == ("model.bin", SIZE, SIZE)


def test_a_partial_file_from_an_earlier_run_is_continued_not_refetched(server, tmp_path):
    (tmp_path / "model.bin.partial").write_bytes(DATA[:1_234_567])
    download(server.url + "manifest.json", tmp_path, **fast())
    assert server.file_requests("model.bin") == ["bytes=1234567-"]
    assert (tmp_path / "model.bin").read_bytes() == DATA


def test_a_server_that_ignores_range_makes_the_file_start_again(server, tmp_path):
    server.ignore_range = True
    server.drops = {"model.bin": [500_000]}
    seen = []
    download(server.url + "manifest.json", tmp_path, progress=lambda *a: seen.append(a), **fast())
    assert (tmp_path / "model.bin").read_bytes() == DATA
    assert server.file_requests("model.bin") == [None, "bytes=500000-"]
    assert ("model.bin", 0, SIZE) in seen[seen.index(("model.bin", 500_000, SIZE)):]


def test_corrupted_content_fails_verification_and_leaves_no_file(server, tmp_path):
    server.files["model.bin"] = DATA[:-1] + bytes([DATA[-1] ^ 1])
    with pytest.raises(DownloadError, match=r"model.bin from .* did not verify \(its SHA-256 is [0-9a-f]{64}, the manifest says"):
        download(server.url + "manifest.json", tmp_path, **fast())
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_server_file_of_another_size_fails_and_leaves_no_file(server, tmp_path):
    server.files["model.bin"] = DATA + b"x"
    with pytest.raises(DownloadError, match="the server's file is .* bytes, the manifest says"):
        download(server.url + "manifest.json", tmp_path, **fast())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../evil.bin", "sub/evil.bin", "..", ".hidden", "a\\b", "/etc/passwd", ""])
def test_a_manifest_naming_a_path_outside_the_destination_is_refused(server, tmp_path, name):
    server.files["bad.json"] = json.dumps(
        {"files": [{"name": name, "size": len(DATA), "sha256": hashlib.sha256(DATA).hexdigest(), "url": "model.bin"}]}
    ).encode()
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError, match="not a plain file name"):
        download(server.url + "bad.json", dest, **fast())
    assert server.file_requests("model.bin") == []
    assert list(tmp_path.iterdir()) == []


def test_a_file_already_present_with_the_right_hash_is_not_fetched(server, tmp_path):
    (tmp_path / "model.bin").write_bytes(DATA)
    seen = []
    assert download(server.url + "manifest.json", tmp_path, progress=lambda *a: seen.append(a), **fast()) == [tmp_path / "model.bin"]
    assert server.file_requests("model.bin") == []
    assert seen == [("model.bin", SIZE, SIZE)]


def test_a_present_file_with_the_wrong_content_is_replaced(server, tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0" * SIZE)
    download(server.url + "manifest.json", tmp_path, **fast())
    assert (tmp_path / "model.bin").read_bytes() == DATA


def test_giving_up_after_the_retries_keeps_the_partial_for_next_time(server, tmp_path):
    server.drops = {"model.bin": [600_000] + [0] * 10}
    with pytest.raises(DownloadError, match=r"failed 3 times in a row .* running the download again resumes there"):
        download(server.url + "manifest.json", tmp_path, **fast(retries=2))
    assert (tmp_path / "model.bin.partial").read_bytes() == DATA[:600_000]
    server.drops = {}
    download(server.url + "manifest.json", tmp_path, **fast())
    assert server.file_requests("model.bin")[-1] == "bytes=600000-"
    assert (tmp_path / "model.bin").read_bytes() == DATA


def test_without_a_callback_a_terminal_gets_a_progress_bar(server, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    download(server.url + "manifest.json", tmp_path, **fast())
    shown = __import__("sys").stderr.getvalue()
    assert "model.bin" in shown and "100%" in shown


def test_an_http_error_is_reported_with_its_status(server, tmp_path):
    server.files["m404.json"] = manifest(("missing.bin", b"abc"))
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url + "m404.json", tmp_path, **fast())


def test_urls_resolve_against_the_manifest_and_its_base_url(server, tmp_path):
    small = b"tokenizer" * 1000
    server.files["blobs/model.bin"] = DATA
    server.files["other/tok.json"] = small
    server.files["models/v1/manifest.json"] = json.dumps({
        "base_url": "../../blobs",
        "files": [
            {"name": "model.bin", "size": SIZE, "sha256": hashlib.sha256(DATA).hexdigest()},
            {"name": "tok.json", "size": len(small), "sha256": hashlib.sha256(small).hexdigest(),
             "url": server.url + "other/tok.json"},
        ],
    }).encode()
    paths = download(server.url + "models/v1/manifest.json", tmp_path, **fast())
    assert [p.read_bytes() for p in paths] == [DATA, small]
    assert server.file_requests("blobs/model.bin") == [None]


def test_a_local_manifest_path_fetches_relative_urls_beside_it(tmp_path, server):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.bin").write_bytes(DATA)
    (src / "manifest.json").write_bytes(manifest(("model.bin", DATA)))
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "model.bin.partial").write_bytes(DATA[:100_000])
    assert download(src / "manifest.json", tmp_path / "dest", chunk_bytes=65536) == [tmp_path / "dest" / "model.bin"]
    assert (tmp_path / "dest" / "model.bin").read_bytes() == DATA


def test_the_packaged_default_model_counts_as_downloaded(tmp_path):
    model = Path(default_model_path())
    seen = []
    assert download(local_manifest(model), model.parent, progress=lambda *a: seen.append(a)) == [model]
    assert seen == [(model.name, model.stat().st_size, model.stat().st_size)]
    assert not (model.parent / (model.name + ".partial")).exists()


def test_local_manifest_copies_and_verifies_into_another_directory(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(DATA)
    m = local_manifest(src)
    assert m["files"] == [{"name": "model.gguf", "size": SIZE, "sha256": hashlib.sha256(DATA).hexdigest(), "url": "model.gguf"}]
    (out,) = download(m, tmp_path / "copy")
    assert out.read_bytes() == DATA


def test_the_cli_downloads_into_the_data_dir_and_resumes(server, tmp_path, capsys):
    from worker.__main__ import main

    server.drops = {"model.bin": [2_000_000]}
    assert main(["download", server.url + "manifest.json", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [str(tmp_path / "models" / "model.bin")]
    assert (tmp_path / "models" / "model.bin").read_bytes() == DATA
    assert server.file_requests("model.bin")[-1] == "bytes=2000000-"
    assert main(["download", server.url + "missing.json", "--data-dir", str(tmp_path)]) == 1
    assert "download failed" in capsys.readouterr().err
