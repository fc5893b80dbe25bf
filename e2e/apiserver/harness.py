"""Test harness: start the API stand-in as a process, talk to it like a client, stop it by PID.

Used by the stand-in's own tests (test_apiserver.py) and the operator convergence test
(test_convergence.py). Everything listens on 127.0.0.1 only; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Iterator

import requests
import yaml

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
STANDIN = HERE / "soma_apiserver.py"

# kind → plural for manifests whose plural is not simply `kind.lower() + "s"`.
PLURALS = {"NetworkPolicy": "networkpolicies", "Endpoints": "endpoints"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, probe: Callable[[], Any], seconds: float = 60.0, interval: float = 0.2) -> Any:
    """Polls `probe` until it returns something truthy (returned), failing the test after
    `seconds` with the last value seen."""
    import pytest  # here, not at the top: scripts/local_up.py imports harness without pytest

    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


def stop_process(proc: subprocess.Popen[Any] | None, grace: float = 5.0) -> None:
    """SIGTERM, wait, then SIGKILL: by PID only."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass


class StandIn:
    """The API stand-in running as a child process on a random 127.0.0.1 port."""

    def __init__(self, workdir: pathlib.Path, *extra: str, crds: pathlib.Path | None = None):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        port_file = workdir / "apiserver.port"
        port_file.unlink(missing_ok=True)  # a stale one would point at a dead server
        args = [sys.executable, str(STANDIN), "--port", "0", "--port-file", str(port_file), *extra]
        if crds is not None:
            args += ["--crds", str(crds)]
        self.log_path = workdir / "apiserver.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)
        deadline = time.monotonic() + 20
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"API stand-in did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"
        self.kube = Kube(self.url)

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()

    def write_kubeconfig(self, path: pathlib.Path) -> pathlib.Path:
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin",
                                                          "namespace": "default"}}],
        }))
        return path

    def stats(self) -> dict[str, Any]:
        return self.kube.session.get(f"{self.url}/_stats", timeout=10).json()


def api_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
             sub: str | None = None) -> str:
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    parts = [root]
    if namespace:
        parts.append(f"namespaces/{namespace}")
    parts.append(plural)
    if name:
        parts.append(name)
    if sub:
        parts.append(sub)
    return "/".join(parts)


def plural_of(kind: str) -> str:
    return PLURALS.get(kind, kind.lower() + "s")


class Kube:
    """A minimal Kubernetes REST client, enough to drive and inspect the stand-in."""

    def __init__(self, base: str):
        self.base = base
        self.session = requests.Session()

    def request(self, method: str, path: str, *, expect: int | tuple[int, ...] | None = None,
                **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 15)
        resp = self.session.request(method, self.base + path, **kwargs)
        if expect is not None:
            want = (expect,) if isinstance(expect, int) else expect
            assert resp.status_code in want, f"{method} {path}: {resp.status_code} {resp.text[:500]}"
        return resp

    def get(self, api_version: str, plural: str, namespace: str | None, name: str, **kw: Any) -> dict[str, Any]:
        return self.request("GET", api_path(api_version, plural, namespace, name), expect=200, **kw).json()

    def get_opt(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        resp = self.request("GET", api_path(api_version, plural, namespace, name))
        return None if resp.status_code == 404 else resp.json()

    def list(self, api_version: str, plural: str, namespace: str | None = None,
             **params: str) -> dict[str, Any]:
        return self.request("GET", api_path(api_version, plural, namespace), params=params, expect=200).json()

    def create(self, obj: dict[str, Any], namespace: str | None = None, expect: Any = 201) -> dict[str, Any]:
        ns = namespace or obj.get("metadata", {}).get("namespace")
        path = api_path(obj["apiVersion"], plural_of(obj["kind"]), ns)
        return self.request("POST", path, json=obj, expect=expect).json()

    def apply(self, obj: dict[str, Any], manager: str = "soma-e2e", force: bool = True, sub: str | None = None,
              expect: Any = (200, 201)) -> dict[str, Any]:
        meta = obj["metadata"]
        path = api_path(obj["apiVersion"], plural_of(obj["kind"]), meta.get("namespace"), meta["name"], sub)
        params = {"fieldManager": manager}
        if force:
            params["force"] = "true"
        return self.request("PATCH", path, params=params, data=json.dumps(obj),
                            headers={"Content-Type": "application/apply-patch+yaml"}, expect=expect).json()

    def patch(self, api_version: str, plural: str, namespace: str | None, name: str, patch: Any,
              kind: str = "merge", sub: str | None = None, expect: Any = 200) -> dict[str, Any]:
        ctype = {"merge": "application/merge-patch+json", "json": "application/json-patch+json",
                 "strategic": "application/strategic-merge-patch+json"}[kind]
        return self.request("PATCH", api_path(api_version, plural, namespace, name, sub), data=json.dumps(patch),
                            headers={"Content-Type": ctype}, expect=expect).json()

    def replace(self, obj: dict[str, Any], sub: str | None = None, expect: Any = 200) -> dict[str, Any]:
        meta = obj["metadata"]
        path = api_path(obj["apiVersion"], plural_of(obj["kind"]), meta.get("namespace"), meta["name"], sub)
        return self.request("PUT", path, json=obj, expect=expect).json()

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str,
               expect: Any = (200, 202), **body: Any) -> dict[str, Any]:
        return self.request("DELETE", api_path(api_version, plural, namespace, name), json=body or None,
                            expect=expect).json()

    def watch(self, api_version: str, plural: str, namespace: str | None = None,
              **params: str) -> Iterator[dict[str, Any]]:
        """Stream watch events; the server ends the stream after `timeoutSeconds` (required)."""
        assert "timeoutSeconds" in params, "bound every watch"
        params = {"watch": "true", **params}
        with self.session.get(self.base + api_path(api_version, plural, namespace), params=params, stream=True,
                              timeout=float(params["timeoutSeconds"]) + 10) as resp:
            assert resp.status_code == 200, resp.text
            for line in resp.iter_lines():
                if line:
                    yield json.loads(line)

    def ensure_namespace(self, name: str) -> None:
        self.request("POST", "/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace",
                                                         "metadata": {"name": name}}, expect=(201, 409))

    def apply_manifest(self, doc: dict[str, Any], manager: str = "kubectl") -> dict[str, Any]:
        """`kubectl apply --server-side` for one document (namespace created when missing)."""
        ns = doc.get("metadata", {}).get("namespace")
        if ns:
            self.ensure_namespace(ns)
        return self.apply(doc, manager=manager)


def load_manifests(path: pathlib.Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and d.get("kind")]
