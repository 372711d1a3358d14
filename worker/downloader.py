"""Seed 004's model downloader: files listed in a manifest, resumable, verified by SHA-256.

Manifest (``manifest.json``)::

    {"files": [{"name": "model.gguf", "size": 98362432, "sha256": "<64 hex>",
                "url": "model.gguf"}],            # optional; default: the name
     "base_url": "https://example.org/models/"}   # optional

A file's URL is ``url`` (or its ``name``) resolved against ``base_url``, which is itself
resolved against the manifest's own location (a URL or a local directory); an absolute
``url`` is used as is. Sources may be ``http(s)://`` URLs, ``file://`` URLs or local
paths. ``name`` is where the file goes in the destination directory and must be a
plain file name: no ``/``, ``\\``, ``..`` or leading ``.``, so a manifest cannot write
outside that directory.

Each file is written to ``<name>.partial``. After a dropped connection the download
resumes where the partial file ends, with ``Range: bytes=<have>-`` (RFC 9110 §14.2):
a ``206`` whose ``Content-Range`` starts there is appended; a ``200`` means the server
ignored the range, so the file restarts from byte 0 (as it does after a ``416``,
a partial file the server cannot continue). The SHA-256 is computed while
streaming (after re-hashing the partial file's bytes on resume). When size and hash
match the manifest the partial file is fsynced and renamed over ``<name>``; otherwise
it is deleted and ``DownloadError`` is raised. A file already present with the right
size and hash is not fetched again (it counts as downloaded), so
``download(local_manifest(model), model.parent)`` finds the packaged default model
already in place.

Failures of the connection (refused, reset, timed out, closed mid-body) and HTTP 5xx,
408 and 429 are retried with exponential backoff (``backoff_s``, doubling, at most
30 s); the count restarts whenever an attempt takes the file past its furthest point
so far, so ``retries`` bounds consecutive attempts that made no progress and a server
that keeps dropping the connection still finishes the file. Other HTTP errors fail at
once. A server's ``Content-Length``/``Content-Range`` total that differs from the
manifest's size fails at once too, before any byte is written.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import httpx

from worker.protocol.units import format_bytes

MiB = 2**20
PARTIAL_SUFFIX = ".partial"
MAX_BACKOFF_S = 30.0
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")

Progress = Callable[[str, int, int], None]  # (file name, bytes done, file size)


class DownloadError(Exception):
    """A download failed or did not verify; ``str(e)`` says what happened and what to do."""


class _Retryable(Exception):
    """An attempt failed in a way worth retrying (connection trouble, HTTP 5xx)."""


@dataclass(frozen=True)
class ManifestFile:
    """One file of a manifest, with its source resolved to a URL or a local path."""

    name: str
    size: int
    sha256: str
    source: str  # http(s) URL or local path


# --- manifest ------------------------------------------------------------------------


def _is_http(s: str) -> bool:
    return urlsplit(s).scheme in ("http", "https")


def _local_path(s: str) -> str | None:
    """The path of a ``file://`` URL, or None for anything else."""
    parts = urlsplit(s)
    return unquote(parts.path) if parts.scheme == "file" else None


def check_name(name: Any) -> str:
    """``name`` if it is a plain file name; DownloadError otherwise (path traversal and the like)."""
    if (not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name
            or "\0" in name or name.endswith(PARTIAL_SUFFIX) or len(name.encode("utf-8")) > 255):
        raise DownloadError(
            f"The manifest names a file {name!r}, which is not a plain file name; "
            "names may not contain '/', '\\' or '..', or start with '.', so the manifest is refused"
        )
    return name


def _resolve(base: str, ref: str) -> str:
    """``ref`` against ``base`` (a URL, or a local directory ending in ``/``)."""
    if _is_http(ref) or _local_path(ref) is not None:
        return ref
    if _is_http(base):
        return urljoin(base, ref)
    base_dir = _local_path(base) or base
    return str(Path(base_dir) / ref) if not Path(ref).is_absolute() else ref


def parse_manifest(obj: Any, location: str) -> list[ManifestFile]:
    """The files of manifest ``obj`` found at ``location`` (a URL, or a directory ending in ``/``).

    Raises DownloadError for a malformed manifest or a name that is not a plain file name.
    """
    if not isinstance(obj, Mapping) or not isinstance(obj.get("files"), list) or not obj["files"]:
        raise DownloadError(f"The manifest at {location} has no \"files\" list; it is not a model manifest")
    base = location
    if obj.get("base_url") is not None:
        if not isinstance(obj["base_url"], str):
            raise DownloadError(f"The manifest at {location} has a base_url that is not a string")
        base_url = obj["base_url"] if obj["base_url"].endswith("/") else obj["base_url"] + "/"
        base = _resolve(location, base_url)
    files, seen = [], set()
    for entry in obj["files"]:
        if not isinstance(entry, Mapping):
            raise DownloadError(f"The manifest at {location} lists a file that is not an object: {entry!r}")
        name = check_name(entry.get("name"))
        size, sha = entry.get("size"), entry.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise DownloadError(f"The manifest gives {name} the size {size!r}; a size is a whole number of bytes")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha.lower()):
            raise DownloadError(f"The manifest gives {name} the sha256 {sha!r}; it must be 64 hexadecimal digits")
        url = entry.get("url", name)
        if not isinstance(url, str) or not url:
            raise DownloadError(f"The manifest gives {name} the url {url!r}; it must be a non-empty string")
        if name in seen:
            raise DownloadError(f"The manifest lists {name} twice")
        seen.add(name)
        files.append(ManifestFile(name, size, sha.lower(), _resolve(base, url)))
    return files


def load_manifest(source: str | os.PathLike | Mapping, client: httpx.Client) -> list[ManifestFile]:
    """Read a manifest from an http(s) URL, a ``file://`` URL or path, or take a dict as is
    (relative URLs then resolve against the current directory). Raises DownloadError."""
    if isinstance(source, Mapping):
        return parse_manifest(source, os.getcwd() + os.sep)
    source = os.fspath(source)
    if _is_http(source):
        try:
            response = client.get(source)
        except httpx.HTTPError as e:
            raise DownloadError(f"The manifest {source} could not be fetched ({type(e).__name__}: {e}); check the address and the network") from None
        if response.status_code != 200:
            raise DownloadError(f"The manifest {source} could not be fetched: the server answered HTTP {response.status_code}")
        text, location = response.text, str(response.url)
    else:
        path = Path(_local_path(source) or source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise DownloadError(f"The manifest {path} cannot be read ({e.strerror or e}); check the path") from None
        location = str(path.resolve().parent) + os.sep
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise DownloadError(f"The manifest at {source} is not JSON ({e})") from None
    return parse_manifest(obj, location)


def file_sha256(path: Path, chunk_bytes: int = MiB) -> str:
    """Hex SHA-256 of the file at ``path`` (read in ``chunk_bytes`` pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def local_manifest(model_path: str | os.PathLike) -> dict:
    """A manifest for one model file already on disk, e.g. the packaged default model
    (``worker.engine.gguf_file.default_model_path()``): ``{"files": [{"name", "size",
    "sha256", "url"}], "base_url"}`` with a ``file://`` base pointing at its directory.

    Downloading it into the file's own directory finds the file verified and fetches
    nothing; into another directory, it copies and verifies. Raises OSError.
    """
    path = Path(model_path).resolve()
    return {
        "files": [{"name": path.name, "size": path.stat().st_size, "sha256": file_sha256(path), "url": path.name}],
        "base_url": path.parent.as_uri() + "/",
    }


# --- transfer ------------------------------------------------------------------------


class _Mismatch(DownloadError):
    """The source's bytes are not the manifest's file (wrong size or hash): the partial file goes."""


class _RangeRefused(_Retryable):
    """HTTP 416: the partial file is no prefix the server can continue; start again from byte 0."""


@contextmanager
def _open_source(f: ManifestFile, have: int, client: httpx.Client, chunk_bytes: int) -> Iterator[tuple[int, Iterator[bytes]]]:
    """Open ``f``'s source at byte ``have``: yields (the offset the data really starts at, chunks).

    The offset is ``have`` when the source honoured the request, 0 when an HTTP server
    ignored the Range header. Raises _Retryable (also for transport errors while the
    caller reads the chunks), _Mismatch (the server's file has another size) or
    DownloadError (other HTTP errors, an unreadable local source).
    """
    if not _is_http(f.source):
        path = _local_path(f.source) or f.source
        try:
            src = open(path, "rb")  # noqa: SIM115 -- closed by the with below; only open() errors are caught here
        except OSError as e:
            raise DownloadError(f"The source of {f.name}, {path}, cannot be read ({e.strerror or e})") from None
        with src:
            if os.fstat(src.fileno()).st_size != f.size:
                raise _Mismatch(f"{path} has {os.fstat(src.fileno()).st_size} bytes, the manifest says {f.size}")
            src.seek(have)
            yield have, iter(lambda: src.read(chunk_bytes), b"")
        return
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with client.stream("GET", f.source, headers=headers) as response:
            status = response.status_code
            if status == 206:
                m = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
                if m is None or int(m.group(1)) != have:
                    raise _Retryable(f"the server answered a range from byte {have} with Content-Range {response.headers.get('content-range')!r}")
                start, total = have, (None if m.group(3) == "*" else int(m.group(3)))
            elif status == 200:
                length = response.headers.get("content-length")
                start, total = 0, (int(length) if length and length.isdigit() else None)
            elif status == 416 and have:
                raise _RangeRefused("the server refused the range (HTTP 416)")
            elif status >= 500 or status in (408, 429):
                raise _Retryable(f"HTTP {status}")
            else:
                raise DownloadError(f"Downloading {f.name} from {f.source} failed: the server answered HTTP {status}; check the manifest's URL")
            if total is not None and total != f.size:
                raise _Mismatch(f"the server's file is {total} bytes, the manifest says {f.size}")
            yield start, response.iter_raw()
    except httpx.TransportError as e:
        raise _Retryable(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None


def _fetch(f: ManifestFile, dest: Path, client: httpx.Client, report: Progress, *, chunk_bytes: int,
           retries: int, backoff_s: float) -> None:
    """Bring ``dest/<name>.partial`` to ``f.size`` bytes, verify it, rename it to ``dest/<name>``.

    An attempt that takes the file past its furthest point so far resets the count of
    failures; restarts (a server ignoring Range, HTTP 416) do not, so they cannot loop.
    """
    partial = dest / (f.name + PARTIAL_SUFFIX)
    final = dest / f.name
    hasher = hashlib.sha256()
    have = partial.stat().st_size if partial.exists() else 0
    if have > f.size:
        partial.unlink()
        have = 0
    if have:
        with open(partial, "rb") as existing:
            while chunk := existing.read(chunk_bytes):
                hasher.update(chunk)
    report(f.name, have, f.size)
    failures, furthest = 0, have
    try:
        with open(partial, "ab") as out:

            def restart() -> None:
                nonlocal hasher, have
                out.truncate(0)
                out.seek(0)
                hasher, have = hashlib.sha256(), 0
                report(f.name, 0, f.size)

            while have < f.size:
                try:
                    with _open_source(f, have, client, chunk_bytes) as (start, chunks):
                        if start != have:  # the server ignored Range: the file starts again
                            restart()
                        for chunk in chunks:
                            if have + len(chunk) > f.size:
                                raise _Mismatch(f"the server sent more than the manifest's {f.size} bytes")
                            out.write(chunk)
                            hasher.update(chunk)
                            have += len(chunk)
                            report(f.name, have, f.size)
                    if have < f.size:
                        raise _Retryable(f"the source ended after {have} of {f.size} bytes")
                except _Retryable as e:
                    out.flush()
                    if isinstance(e, _RangeRefused):
                        restart()
                    failures = 0 if have > furthest else failures + 1
                    furthest = max(furthest, have)
                    if failures > retries:
                        raise DownloadError(
                            f"Downloading {f.name} failed {failures} times in a row ({e}); {format_bytes(have)} of "
                            f"{format_bytes(f.size)} are kept in {partial.name}, so running the download again resumes there"
                        ) from None
                    if failures:
                        time.sleep(min(MAX_BACKOFF_S, backoff_s * 2 ** (failures - 1)))
            out.flush()
            os.fsync(out.fileno())
        digest = hasher.hexdigest()
        if digest != f.sha256:
            raise _Mismatch(f"its SHA-256 is {digest}, the manifest says {f.sha256}")
    except _Mismatch as e:
        partial.unlink(missing_ok=True)
        raise DownloadError(
            f"{f.name} from {f.source} did not verify ({e}), so the partial download was deleted; "
            "check the manifest and the source, then run the download again") from None
    os.replace(partial, final)
    _fsync_dir(dest)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _already_present(f: ManifestFile, final: Path, chunk_bytes: int) -> bool:
    try:
        return final.is_file() and final.stat().st_size == f.size and file_sha256(final, chunk_bytes) == f.sha256
    except OSError:
        return False


class _Bars:
    """tqdm bars, one per file, fed by the progress callback (only for a terminal)."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, name: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(name)
        if bar is None:
            bar = self.bars[name] = tqdm(total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                                         leave=True, file=sys.stderr)
        bar.update(done - bar.n)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def download(manifest_source: str | os.PathLike | Mapping, dest_dir: Path, *, progress: Progress | None = None,
             chunk_bytes: int = MiB, retries: int = 5, timeout_s: float = 30, backoff_s: float = 0.5) -> list[Path]:
    """Download every file of a manifest into ``dest_dir``; return their paths in manifest order.

    ``manifest_source``: an http(s) URL, a ``file://`` URL or local path of ``manifest.json``,
    or the manifest itself as a dict. ``progress(name, bytes_done, size)`` is called as
    bytes arrive (non-decreasing, except back to 0 when a server ignores a Range request
    and the file restarts) and finally with ``bytes_done == size``; without it a ``tqdm``
    bar is shown when stderr is a terminal. Network bytes are written as they arrive (so
    a dropped connection loses none of what was received); ``chunk_bytes`` is the read
    size for local sources and for hashing. ``timeout_s`` bounds connecting and each
    read; ``retries`` and ``backoff_s`` govern retries (module docstring). The proxy
    environment variables (``HTTPS_PROXY``, ``NO_PROXY``, ...) apply, as in ``httpx``.

    Raises DownloadError: a malformed manifest or file name, an HTTP error, too many
    failed attempts (the partial file is kept for the next run), not enough disk space,
    or a file whose size or SHA-256 does not match (its partial file is deleted);
    OSError when ``dest_dir`` or a local source cannot be written or read.
    """
    if chunk_bytes < 1 or retries < 0 or timeout_s <= 0 or backoff_s < 0:
        raise ValueError("chunk_bytes must be >= 1, retries >= 0, timeout_s > 0 and backoff_s >= 0")
    dest = Path(dest_dir)
    bars = _Bars() if progress is None and sys.stderr.isatty() else None
    report: Progress = progress or bars or (lambda name, done, total: None)
    try:
        with httpx.Client(timeout=timeout_s, follow_redirects=True) as client:
            files = load_manifest(manifest_source, client)
            dest.mkdir(parents=True, exist_ok=True)
            todo = [f for f in files if not _already_present(f, dest / f.name, chunk_bytes)]
            _check_space(dest, todo)
            for f in files:
                if f in todo:
                    _fetch(f, dest, client, report, chunk_bytes=chunk_bytes, retries=retries, backoff_s=backoff_s)
                else:
                    report(f.name, f.size, f.size)
    finally:
        if bars is not None:
            bars.close()
    return [dest / f.name for f in files]


def _check_space(dest: Path, todo: list[ManifestFile]) -> None:
    """DownloadError when ``dest``'s filesystem cannot take what is still to download."""
    needed = 0
    for f in todo:
        partial = dest / (f.name + PARTIAL_SUFFIX)
        have = partial.stat().st_size if partial.exists() else 0
        needed += max(0, f.size - have)
    free = shutil.disk_usage(dest).free
    if needed > free:
        raise DownloadError(
            f"The download needs {format_bytes(needed)} more in {dest}, which has {format_bytes(free)} free; free some space or choose another directory"
        )


__all__ = ["DownloadError", "ManifestFile", "check_name", "download", "file_sha256", "load_manifest", "local_manifest", "parse_manifest"]
