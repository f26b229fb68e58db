"""A small in-memory Hugging Face Hub for tests: just the endpoints huggingface_hub 2.4 and transformers 5.23 call.

Covered: whoami-v2, repo creation, README YAML validation, branch creation, preupload (always "regular", so file
contents travel base64-encoded inside the NDJSON commit: no LFS, no Xet), commit, model info, tree listing and
resolve (GET and HEAD, with X-Repo-Commit and ETag). Every request is recorded so tests can inspect what was sent.

    with HubServer(users={"hf_secret": ("alice", {"alice-lab": "write"})}) as hub:
        env = {"HF_ENDPOINT": hub.url, ...}
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

WRITE_ROLES = {"admin", "write", "contributor"}


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, which the Hub uses as oid and ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Repo:
    owner: str
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit oid -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit oid
    messages: dict[str, str] = field(default_factory=dict)  # commit oid -> summary

    def resolve(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.commits else None)

    def add_commit(self, branch: str, files: dict[str, bytes], summary: str) -> str:
        parent = self.refs.get(branch, "")
        listing = json.dumps(
            [parent, summary, len(self.commits), sorted((p, git_blob_oid(c)) for p, c in files.items())]
        )
        oid = hashlib.sha1(listing.encode()).hexdigest()
        self.commits[oid], self.refs[branch], self.messages[oid] = files, oid, summary
        return oid


def _front_matter(readme: bytes | None) -> dict:
    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", (readme or b"").decode("utf-8", "replace"), re.S)
    return (yaml.safe_load(match.group(1)) or {}) if match else {}


class HubState:
    """Users, repositories and the request log, shared by the handler threads."""

    def __init__(self, users: dict[str, tuple[str, dict[str, str]]]) -> None:
        self.users = users  # token -> (user name, {org name: role})
        self.repos: dict[str, Repo] = {}
        self.requests: list[RecordedRequest] = []
        self.lock = threading.Lock()

    def can_write(self, token: str | None, namespace: str) -> bool:
        if token not in self.users:
            return False
        name, orgs = self.users[token]
        return namespace == name or orgs.get(namespace) in WRITE_ROLES

    def can_read(self, token: str | None, repo: Repo) -> bool:
        if not repo.private:
            return True
        return token in self.users and (repo.owner == self.users[token][0] or repo.owner in self.users[token][1])


REPO = r"(?P<repo>[^/?]+/[^/?]+)"
REV = r"(?P<rev>[^/?]+)"
ROUTES = [
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{REPO}/branch/{REV}$"), "create_branch"),
    ("POST", re.compile(rf"^/api/models/{REPO}/preupload/{REV}$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{REPO}/commit/{REV}$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{REPO}/tree/{REV}(?:/(?P<path>[^?]*))?$"), "tree"),
    ("GET", re.compile(rf"^/api/models/{REPO}(?:/revision/{REV})?$"), "model_info"),
    ("GET", re.compile(rf"^/{REPO}/resolve/{REV}/(?P<path>[^?]+)$"), "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects; every response carries a Content-Length

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - silence the per-request stderr lines
        pass

    @property
    def hub(self) -> HubState:
        return self.server.hub  # type: ignore[attr-defined]

    @property
    def token(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        # huggingface_hub sends every body (JSON, NDJSON commit) in one piece with a Content-Length, never chunked.
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        with self.hub.lock:
            self.hub.requests.append(RecordedRequest(method, self.path, dict(self.headers), body))
        for route_method, pattern, name in ROUTES:
            match = pattern.match(url.path)
            if match and (route_method == method or (method == "HEAD" and name == "resolve")):
                args = {key: unquote(value) if value is not None else None for key, value in match.groupdict().items()}
                with self.hub.lock:
                    getattr(self, name)(body=body, head=method == "HEAD", **args)
                return
        self._error(404, f"no route for {method} {url.path}")

    # --- responses ---
    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not head:
            self.wfile.write(payload)

    def _json(self, data, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode())

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False, **headers: str) -> None:
        extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **headers}
        self._send(status, json.dumps({"error": message}).encode(), extra, head=head)

    def _readable_repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or not self.hub.can_read(self.token, repo):
            self._error(404, "Repository not found", "RepoNotFound", head=head)
            return None
        return repo

    def _writable_repo(self, repo_id: str, rev: str | None = None) -> Repo | None:
        if self.token not in self.hub.users:
            self._error(401, "Invalid credentials in Authorization header")
            return None
        repo = self._readable_repo(repo_id)
        if repo is None:
            return None
        if not self.hub.can_write(self.token, repo.owner):
            self._error(403, f"You don't have the rights to write to {repo_id}")
            return None
        if rev is not None and rev not in repo.refs:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return None
        return repo

    # --- endpoints ---
    def whoami(self, **_) -> None:
        if self.token not in self.hub.users:
            return self._error(401, "Invalid credentials in Authorization header")
        name, orgs = self.hub.users[self.token]
        org_list = [{"type": "org", "name": org, "roleInOrg": role} for org, role in orgs.items()]
        self._json({"type": "user", "name": name, "fullname": name.title(), "orgs": org_list, "auth": {}})

    def create_repo(self, body: bytes, **_) -> None:
        if self.token not in self.hub.users:
            return self._error(401, "Invalid credentials in Authorization header")
        payload = json.loads(body)
        namespace = payload.get("organization") or self.hub.users[self.token][0]
        repo_id = f"{namespace}/{payload['name']}"
        if payload.get("type") not in (None, "model"):
            return self._error(400, "this test server only hosts model repositories")
        if not self.hub.can_write(self.token, namespace):
            return self._error(403, f"You don't have the rights to create a model under the namespace {namespace}")
        if repo_id in self.hub.repos:  # the Hub's 409 still names the repo, and huggingface_hub reads it
            url = f"http://{self.headers['host']}/{repo_id}"
            return self._send(409, json.dumps({"error": "You already created this model repo", "url": url}).encode())
        repo = Repo(owner=namespace, private=payload.get("visibility") == "private")
        repo.add_commit("main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, "initial")
        self.hub.repos[repo_id] = repo
        self._json({"url": f"http://{self.headers['host']}/{repo_id}", "name": repo_id})

    def validate_yaml(self, body: bytes, **_) -> None:
        try:
            _front_matter(json.loads(body)["content"].encode())
        except yaml.YAMLError as error:
            return self._json({"errors": [{"message": str(error)}]}, status=400)
        self._json({"errors": [], "warnings": []})

    def create_branch(self, repo: str, rev: str, body: bytes, **_) -> None:
        if (found := self._writable_repo(repo)) is None:
            return
        if rev in found.refs:
            return self._error(409, f"Reference already exists: refs/heads/{rev}")
        start = found.resolve((json.loads(body or b"{}") or {}).get("startingPoint") or "main")
        found.refs[rev] = start
        self._json({})

    def preupload(self, repo: str, rev: str, body: bytes, **_) -> None:
        if (found := self._writable_repo(repo, rev)) is None:
            return
        current = found.commits[found.refs[rev]]
        files = [
            {
                "path": item["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_oid(current[item["path"]]) if item["path"] in current else None,
            }
            for item in json.loads(body)["files"]
        ]
        self._json({"files": files, "commitOid": found.refs[rev]})

    def commit(self, repo: str, rev: str, body: bytes, **_) -> None:
        if (found := self._writable_repo(repo, rev)) is None:
            return
        files = dict(found.commits[found.refs[rev]])
        summary = ""
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value["summary"]
                if value.get("parentCommit") not in (None, found.refs[rev]):
                    return self._error(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                return self._error(400, f"the test server does not support {key!r} operations (LFS/Xet)")
        oid = found.add_commit(rev, files, summary)
        url = f"http://{self.headers['host']}/{repo}/commit/{oid}"
        self._json({"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None})

    def model_info(self, repo: str, rev: str | None = None, **_) -> None:
        if (found := self._readable_repo(repo)) is None:
            return
        if (oid := found.resolve(rev or "main")) is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        files = found.commits[oid]
        card = _front_matter(files.get("README.md"))
        config = json.loads(files["config.json"]) if "config.json" in files else {}
        info = {
            "id": repo,
            "modelId": repo,
            "author": found.owner,
            "sha": oid,
            "private": found.private,
            "disabled": False,
            "gated": False,
            "lastModified": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            "library_name": card.get("library_name"),
            "pipeline_tag": card.get("pipeline_tag"),
            "tags": list(card.get("tags") or []) + ([card["library_name"]] if card.get("library_name") else []),
            "cardData": card,
            "config": {key: config[key] for key in ("model_type", "architectures") if key in config},
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }
        self._json(info)

    def tree(self, repo: str, rev: str, path: str | None = None, **_) -> None:
        if (found := self._readable_repo(repo)) is None:
            return
        if (oid := found.resolve(rev)) is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        prefix = f"{path.strip('/')}/" if path else ""
        recursive = self.query.get("recursive", "false").lower() == "true"
        entries, folders = [], set()
        for file_path, content in sorted(found.commits[oid].items()):
            if not file_path.startswith(prefix):
                continue
            rest = file_path[len(prefix) :]
            parts = rest.split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": file_path, "size": len(content), "oid": git_blob_oid(content)})
        if prefix and not entries and not folders:
            return self._error(404, f"{path} does not exist on {rev}", "EntryNotFound")
        folder_oid = hashlib.sha1(oid.encode()).hexdigest()
        self._json([{"type": "directory", "path": folder, "oid": folder_oid} for folder in sorted(folders)] + entries)

    def resolve(self, repo: str, rev: str, path: str, head: bool = False, **_) -> None:
        if (found := self._readable_repo(repo, head=head)) is None:
            return
        if (oid := found.resolve(rev)) is None:
            return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound", head=head)
        content = found.commits[oid].get(path)
        if content is None:
            return self._error(404, "Entry not found", "EntryNotFound", head=head, **{"X-Repo-Commit": oid})
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": oid,
            "ETag": f'"{git_blob_oid(content)}"',
        }
        self._send(200, content, headers, head=head)


class HubServer:
    """Serves a `HubState` on 127.0.0.1 at a free port from a daemon thread; use as a context manager."""

    def __init__(self, users: dict[str, tuple[str, dict[str, str]]]) -> None:
        self.state = HubState(users)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self.state  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
