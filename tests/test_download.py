"""MIND download against a local HTTP server on 127.0.0.1 serving generated zips."""
from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from newsrec.cli import main
from newsrec.data import download
from newsrec.data.download import DownloadError, download_file, download_mind
from tests.mindfiles import behaviors_row, news_row, write_split


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` (name → bytes) with HTTP Range support (unless disabled)."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's spelling)
        server = self.server
        name = self.path.lstrip("/").split("/")[-1]
        server.requests.append((name, self.headers.get("Range")))
        data = server.files.get(name)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        range_header = self.headers.get("Range")
        if range_header and server.ranges:
            start = int(range_header.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        if server.etag:
            self.send_header("ETag", f'"{server.etag.get(name, "")}"')
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.ranges, httpd.etag = {}, [], True, None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/datasets/MIND/resolve/main"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _zip_bytes(tmp_path: Path, name: str, n_news: int = 200) -> bytes:
    news = [news_row(f"N{i}", title=f"title {i} " * 5) for i in range(1, n_news + 1)]
    rows = [behaviors_row(i, f"U{i}", [f"N{i}"], [(f"N{i + 1}", 1)]) for i in range(1, n_news)]
    path = write_split(tmp_path / "src" / name, news=news, behaviors=rows, as_zip=True, subfolder=name[:-4])
    return path.read_bytes()


@pytest.fixture
def small_files(tmp_path, server):
    files = {name: _zip_bytes(tmp_path, name) for name in download.MIND_FILES["small"]}
    server.files.update(files)
    return files


def test_full_download_writes_files_and_checksums(tmp_path, server, small_files):
    got = download_mind("small", dest=tmp_path / "raw", base_url=server.url)
    assert [g.path.name for g in got] == ["MINDsmall_train.zip", "MINDsmall_dev.zip"]
    for item in got:
        data = small_files[item.path.name]
        assert item.path.read_bytes() == data
        assert item.sha256 == hashlib.sha256(data).hexdigest() and item.size == len(data)
        assert item.resumed_from == 0 and not item.already_present
        sidecar = item.path.with_name(item.path.name + ".sha256").read_text()
        assert sidecar == f"{item.sha256}  {item.path.name}\n"
        assert not item.path.with_name(item.path.name + ".part").exists()
    # a second run finds complete, verified files and fetches nothing
    server.requests.clear()
    again = download_mind("small", dest=tmp_path / "raw", base_url=server.url)
    assert all(g.already_present for g in again) and server.requests == []


def test_resume_from_a_partial_file(tmp_path, server, small_files):
    name = "MINDsmall_train.zip"
    data = small_files[name]
    dest = tmp_path / "raw"
    dest.mkdir()
    half = len(data) // 2
    (dest / f"{name}.part").write_bytes(data[:half])
    got = download_file(f"{server.url}/{name}", dest / name)
    assert got.resumed_from == half
    assert (dest / name).read_bytes() == data
    assert server.requests == [(name, f"bytes={half}-")]


def test_server_without_range_support_restarts_cleanly(tmp_path, server, small_files):
    server.ranges = False
    name = "MINDsmall_dev.zip"
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / f"{name}.part").write_bytes(b"garbage that is not a prefix")
    got = download_file(f"{server.url}/{name}", dest / name)
    assert got.resumed_from == 0 and (dest / name).read_bytes() == small_files[name]


def test_checksum_mismatch_is_an_error_and_leaves_nothing(tmp_path, server, small_files):
    name = "MINDsmall_train.zip"
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / f"{name}.sha256").write_text("0" * 64 + f"  {name}\n")
    with pytest.raises(DownloadError, match="does not match the expected 0000"):
        download_file(f"{server.url}/{name}", dest / name)
    assert not (dest / name).exists() and not (dest / f"{name}.part").exists()


def test_checksum_from_etag_is_verified(tmp_path, server, small_files):
    name = "MINDsmall_dev.zip"
    server.etag = {name: hashlib.sha256(b"other content").hexdigest()}
    with pytest.raises(DownloadError, match="does not match"):
        download_file(f"{server.url}/{name}", tmp_path / name)
    server.etag = {name: hashlib.sha256(small_files[name]).hexdigest()}
    assert download_file(f"{server.url}/{name}", tmp_path / name).sha256 == server.etag[name]


def test_not_a_zip_and_http_errors(tmp_path, server):
    server.files["MINDsmall_train.zip"] = b"<html>login page</html>"
    with pytest.raises(DownloadError, match="not a valid zip"):
        download_file(f"{server.url}/MINDsmall_train.zip", tmp_path / "MINDsmall_train.zip")
    assert not (tmp_path / "MINDsmall_train.zip.part").exists()
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(f"{server.url}/missing.zip", tmp_path / "missing.zip")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_unreachable_host_prints_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NEWSREC_PROGRESS", "0")
    url = f"http://127.0.0.1:{_closed_port()}/mind"
    result = CliRunner().invoke(main, ["download", "small", "--dest", str(tmp_path / "raw"), "--base-url", url])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error: cannot reach http://127.0.0.1:") and "--base-url" in lines[-1]
    assert "Traceback" not in result.output
    assert not list((tmp_path / "raw").glob("*.zip"))


def test_cli_base_url_from_environment(tmp_path, server, small_files, monkeypatch):
    monkeypatch.setenv("NEWSREC_PROGRESS", "0")
    monkeypatch.setenv(download.BASE_URL_ENV, server.url)
    result = CliRunner().invoke(main, ["download", "small", "--dest", str(tmp_path / "raw")])
    assert result.exit_code == 0, result.output
    assert server.url in result.output and "downloaded" in result.output
    assert (tmp_path / "raw" / "MINDsmall_dev.zip").read_bytes() == small_files["MINDsmall_dev.zip"]
