"""Real signing tools for the e2e tests: a docker-registry on 127.0.0.1, oras and the cosign CLI.

The tools come from `scripts/test-deps/signing-tools.sh`, which prints `SOMA_COSIGN=`,
`SOMA_ORAS=` and `SOMA_REGISTRY=` (scripts/test exports them). `tools()` returns None when
any is missing, so a test module can skip plainly.

    Workdir (own HOME, DOCKER_CONFIG, COSIGN_PASSWORD; no user config or credentials read)
      ├─ key_pair("soma")          cosign generate-key-pair   → soma.key, soma.pub (PEM)
      ├─ push(reg, repo, tag, ..)  oras push --plain-http      → manifest digest
      ├─ push_capsule(reg, ..)     oras push of a Capsule bundle (docs/capsules.md) → digest
      ├─ sign(key, reg, repo, d)   cosign sign --key --tlog-upload=false (plain HTTP registry)
      ├─ sign_blob(key, file)      cosign sign-blob --key      → base64 signature
      └─ copy_signature(..)        oras tag <A's .sig> <B's .sig tag>  (a replayed signature)
    Registry: docker-registry serve <config> on a free port in a temp folder, stopped by PID.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import socket
import subprocess
import tarfile
import time
from dataclasses import dataclass
from typing import Any

from harness import free_port, stop_process

PASSWORD = "soma-e2e"
ARTIFACT_TYPE = "application/vnd.soma.capsule.v1+json"


@dataclass(frozen=True)
class Tools:
    cosign: str
    oras: str
    registry: str


def tools() -> Tools | None:
    """The tools named by SOMA_COSIGN/SOMA_ORAS/SOMA_REGISTRY, or None when one is missing."""
    paths = [os.environ.get(v, "") for v in ("SOMA_COSIGN", "SOMA_ORAS", "SOMA_REGISTRY")]
    if not all(p and os.access(p, os.X_OK) for p in paths):
        return None
    return Tools(*paths)


class Registry:
    """A docker-registry serving plain HTTP on 127.0.0.1:<free port>, data in `workdir`."""

    def __init__(self, tools: Tools, workdir: pathlib.Path):
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.addr = f"127.0.0.1:{self.port}"
        config = workdir / "registry.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.addr}\n")
        self.log_path = workdir / "registry.log"
        self._log = open(self.log_path, "wb")
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [tools.registry, "serve", str(config)], stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"docker-registry did not listen on {self.addr}:\n"
                                       f"{self.log_path.read_text(errors='replace')[-2000:]}")
                time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None
        self._log.close()


class Workdir:
    """A folder where cosign and oras run, with their own HOME and DOCKER_CONFIG."""

    def __init__(self, tools: Tools, path: pathlib.Path):
        self.tools = tools
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def run(self, program: str, *args: str) -> str:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.path),
               "DOCKER_CONFIG": str(self.path), "COSIGN_PASSWORD": PASSWORD,
               "TUF_ROOT": str(self.path / "tuf")}
        out = subprocess.run([program, *args], cwd=self.path, env=env, stdin=subprocess.DEVNULL,
                             capture_output=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"{pathlib.Path(program).name} {' '.join(args)} failed ({out.returncode}):\n"
                               f"{out.stderr.decode(errors='replace')[-2000:]}")
        return out.stdout.decode()

    def cosign(self, *args: str) -> str:
        return self.run(self.tools.cosign, *args)

    def oras(self, *args: str) -> str:
        return self.run(self.tools.oras, *args)

    def key_pair(self, name: str) -> str:
        """`cosign generate-key-pair`; returns the public key PEM (`NAME.pub`; `NAME.key` beside it)."""
        self.cosign("generate-key-pair", "--output-key-prefix", name)
        return (self.path / f"{name}.pub").read_text()

    def push(self, registry: str, repo: str, tag: str, content: str | bytes) -> str:
        """Pushes `content` as a one-layer artifact to `registry/repo:tag`; returns its digest."""
        name = f"{repo.replace('/', '_')}-{tag}.json"
        data = content.encode() if isinstance(content, str) else content
        (self.path / name).write_bytes(data)
        target = f"{registry}/{repo}:{tag}"
        self.oras("push", "--plain-http", target, f"{name}:{ARTIFACT_TYPE}")
        return self.oras("resolve", "--plain-http", target).strip()

    def push_capsule(self, registry: str, repo: str, tag: str, content: str, policy_hash: str,
                     version: str = "1") -> str:
        """Pushes `content` as a Capsule bundle (one document, one chunk; the format of
        docs/capsules.md, made here with oras alone) to `registry/repo:tag`; returns its digest.
        `content` must be one paragraph of at most 1500 bytes without surrounding whitespace, so
        it is its own single chunk."""
        text = content.encode()
        assert text == text.strip() and b"\n\n" not in text and len(text) <= 1500, content
        folder = self.path / f"capsule-{repo.replace('/', '_')}-{tag}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
            info = tarfile.TarInfo("content.json")
            info.size, info.mtime, info.mode = len(text), 0, 0o644
            t.addfile(info, io.BytesIO(text))
        (folder / "documents.tar").write_bytes(buf.getvalue())
        chunk = {"id": "content.json#0", "document": "content.json", "start": 0, "end": len(text),
                 "text": content}
        (folder / "chunks.jsonl").write_bytes(json.dumps(chunk, separators=(",", ":")).encode() + b"\n")
        (folder / "capsule.json").write_text(json.dumps({
            "schemaVersion": 1, "version": version, "policyHash": policy_hash,
            "chunking": {"maxBytes": 1500}, "documents": 1, "chunks": 1}))
        target = f"{registry}/{repo}:{tag}"
        self.run(self.tools.oras, "push", "--plain-http", target,
                 "--config", f"{folder.name}/capsule.json:application/vnd.soma.capsule.config.v1+json",
                 "--annotation", f"dev.soma.capsule.version={version}",
                 "--annotation", f"dev.soma.capsule.policy-hash={policy_hash}",
                 f"{folder.name}/documents.tar:application/vnd.soma.capsule.documents.v1.tar",
                 f"{folder.name}/chunks.jsonl:application/vnd.soma.capsule.chunks.v1+jsonl")
        return self.oras("resolve", "--plain-http", target).strip()

    def sign(self, key: str, registry: str, repo: str, digest: str) -> None:
        """`cosign sign --key KEY.key registry/repo@digest`, offline (no transparency log)."""
        self.cosign("sign", "--key", f"{key}.key", "--tlog-upload=false", "--allow-http-registry",
                    "--allow-insecure-registry", "--yes", f"{registry}/{repo}@{digest}")

    def sign_blob(self, key: str, content: str | bytes, name: str) -> str:
        """Writes `content` to `name` and `cosign sign-blob --key KEY.key`s it; returns the
        base64 signature (what goes under `<key>.sig` in a ConfigMap)."""
        data = content.encode() if isinstance(content, str) else content
        (self.path / name).write_bytes(data)
        self.cosign("sign-blob", "--key", f"{key}.key", "--tlog-upload=false", "--yes",
                    "--output-signature", f"{name}.sig", name)
        return (self.path / f"{name}.sig").read_text().strip()

    def verify(self, key: str, registry: str, repo: str, digest: str) -> bool:
        """Whether the cosign CLI itself accepts `registry/repo@digest`'s signature by KEY.pub."""
        try:
            self.cosign("verify", "--key", f"{key}.pub", "--insecure-ignore-tlog", "--allow-http-registry",
                        "--allow-insecure-registry", f"{registry}/{repo}@{digest}")
            return True
        except RuntimeError:
            return False

    def copy_signature(self, registry: str, repo: str, source: str, target: str) -> None:
        """Tags artifact `source`'s cosign signature manifest as `target`'s: a genuine
        signature replayed onto another artifact."""
        self.oras("tag", "--plain-http", f"{registry}/{repo}:{signature_tag(source)}", signature_tag(target))


def signature_tag(digest: str) -> str:
    """The tag cosign stores `digest`'s signatures under."""
    algorithm, hexdigest = digest.split(":", 1)
    return f"{algorithm}-{hexdigest}.sig"


def sha256(data: str | bytes) -> str:
    return "sha256:" + hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)
