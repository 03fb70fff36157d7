"""A local stand-in for the Hugging Face Hub: serves folders as *dataset* repositories on 127.0.0.1.

The real `huggingface_hub` client (2.4.0) talks to it unchanged, through the endpoints it uses:

    GET  /api/datasets/{repo}[/revision/{rev}]          dataset_info / repo_info   -> {"id", "sha", ...}
    GET  /api/datasets/{repo}/tree/{rev}[/{path}]       list_repo_tree (?recursive=, paged by a Link header)
    HEAD /datasets/{repo}/resolve/{rev}/{path}          file metadata: X-Repo-Commit, ETag, X-Linked-*
    GET  /datasets/{repo}/resolve/{rev}/{path}          the file's bytes (Range honoured), counted in `served`

Every file is described as an LFS file whose sha256 is the real sha256 of its bytes, and its blob id is its
real git blob sha1, so `HfApi.verify_repo_checksums` can check a download. No Xet header or `xetHash` is ever
sent, so the client never takes the hf_xet path. Unknown repos, revisions and files are 404s carrying the hub's
X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), so the client raises its usual errors.

    with HubStandin({"org/corpus": folder}) as hub:   # then HF_ENDPOINT=hub.endpoint, or endpoint=hub.endpoint
        ...
        assert sum(hub.served.values()) == 2
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

DEFAULT_COMMIT = "5eedc0ffee5eedc0ffee5eedc0ffee5eedc0ffee"
Answer = tuple[int, dict[str, str], bytes]  # status, headers, body


def _describe(folder: Path) -> dict[str, dict]:
    """Repo path -> {"file", "size", "sha256", "oid"} for every file under `folder`."""
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        files[file.relative_to(folder).as_posix()] = {
            "file": file,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),  # git's blob id
        }
    return files


def _error(status: int, code: str, message: str, commit: str | None = None) -> Answer:
    headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
    if commit is not None:
        headers["X-Repo-Commit"] = commit  # lets the client cache the file's absence
    return status, headers, json.dumps({"error": message}).encode()


def _json(payload: object, **headers: str) -> Answer:
    return 200, {"Content-Type": "application/json", **headers}, json.dumps(payload).encode()


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) of a `Range: bytes=first-[last]` header, or None for the whole file."""
    if not header or not header.startswith("bytes="):
        return None
    first, _, last = header[len("bytes="):].partition("-")
    return int(first), min(int(last) if last else size - 1, size - 1)


class HubStandin:
    """Serve `repos` (repo id -> local folder) as dataset repositories, all at one fixed `commit`.

    `endpoint` is known once entered. `served` counts, per path in the repo, the file bodies sent (GETs on
    resolve); `calls` lists every request as "METHOD /path?query". Folders are read on entering.
    """

    def __init__(self, repos: dict[str, Path], commit: str = DEFAULT_COMMIT, page_size: int = 1000,
                 delay: float = 0.0):
        self.repos = {repo_id: Path(folder) for repo_id, folder in repos.items()}
        self.commit = commit
        self.page_size = page_size  # the hub pages trees at 1000 entries
        self.endpoint = ""
        self.served: collections.Counter[str] = collections.Counter()
        self.calls: list[str] = []
        self.delay = delay  # seconds each file body takes, so parallel downloads overlap visibly
        self.in_flight = self.peak = 0  # file bodies being served now / at most at once
        self._files: dict[str, dict[str, dict]] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> HubStandin:
        self._files = {repo_id: _describe(folder) for repo_id, folder in self.repos.items()}
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-standin", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def answer(self, method: str, raw: str, range_header: str | None) -> Answer:
        """Route one request: the API under /api/datasets/, file contents under /datasets/.../resolve/."""
        with self._lock:
            self.calls.append(f"{method} {raw}")
        url = urlsplit(raw)
        api = url.path.startswith("/api/datasets/")
        rest = url.path.removeprefix("/api/datasets/" if api else "/datasets/")
        repo_id = next((r for r in sorted(self.repos, key=len, reverse=True)
                        if rest == r or rest.startswith(r + "/")), None)
        if repo_id is None or not (api or url.path.startswith("/datasets/")):
            return _error(404, "RepoNotFound", f"Repository not found: {url.path}")
        kind, rev, path = ([unquote(s) for s in rest[len(repo_id) + 1:].split("/", 2)] + ["", "", ""])[:3]
        if api and kind == "":
            rev = "main"
        if rev not in ("main", self.commit):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = self._files[repo_id]
        if api and kind in ("", "revision"):
            siblings = [{"rfilename": p, "size": f["size"]} for p, f in files.items()]
            return _json({"id": repo_id, "sha": self.commit, "private": False, "gated": False,
                          "disabled": False, "siblings": siblings})
        if api and kind == "tree":
            return self._tree(files, path, parse_qs(url.query), url.path)
        if not api and kind == "resolve":
            return self._resolve(files, path, method, range_header)
        return _error(404, "RepoNotFound", f"Not served by the stand-in: {url.path}")

    def _tree(self, files: dict[str, dict], folder: str, query: dict[str, list[str]], path: str) -> Answer:
        """One page of the listing of `folder` ('' = root): RepoFolder and RepoFile entries."""
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        prefix = folder + "/" if folder else ""
        folders = sorted({p.rsplit("/", n)[0] for p in files for n in range(1, p.count("/") + 1)})
        if folder and folder not in folders:
            return _error(404, "EntryNotFound", f"{folder} does not exist on {self.commit}", self.commit)

        def wanted(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])

        entries = [{"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p}
                   for p in folders if wanted(p)]
        entries += [{"type": "file", "oid": f["oid"], "size": f["size"], "path": p,
                     "lfs": {"oid": f["sha256"], "size": f["size"], "pointerSize": 134}}
                    for p, f in files.items() if wanted(p)]
        start = int(query.get("cursor", ["0"])[0])
        headers = {}
        if start + self.page_size < len(entries):
            more = urlencode({**{k: v[0] for k, v in query.items()}, "cursor": start + self.page_size})
            headers["Link"] = f'<{self.endpoint}{path}?{more}>; rel="next"'
        return _json(entries[start:start + self.page_size], **headers)

    def _resolve(self, files: dict[str, dict], path: str, method: str, range_header: str | None) -> Answer:
        """A file's metadata (HEAD) or bytes (GET, whole or one range)."""
        if path not in files:
            return _error(404, "EntryNotFound", f"{path} does not exist on {self.commit}", self.commit)
        info = files[path]
        headers = {"X-Repo-Commit": self.commit, "ETag": f'"{info["sha256"]}"', "X-Linked-Etag": f'"{info["sha256"]}"',
                   "X-Linked-Size": str(info["size"]), "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        data = info["file"].read_bytes()
        span = _byte_range(range_header, len(data)) if method == "GET" else None
        if method == "GET":
            self._count_body(path)
        if span is None:
            return 200, headers, data
        headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{len(data)}"
        return 206, headers, data[span[0]:span[1] + 1]


    def _count_body(self, path: str) -> None:
        """Count a file body served, and how many are served at once (each taking `delay` seconds)."""
        with self._lock:
            self.served[path] += 1
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        time.sleep(self.delay)
        with self._lock:
            self.in_flight -= 1


class _Handler(BaseHTTPRequestHandler):
    hub: HubStandin

    def do_GET(self) -> None:
        self._send(self.hub.answer("GET", self.path, self.headers.get("Range")), body=True)

    def do_HEAD(self) -> None:
        self._send(self.hub.answer("HEAD", self.path, None), body=False)

    def _send(self, answer: Answer, body: bool) -> None:
        status, headers, payload = answer
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # quiet: `HubStandin.calls` records every request
