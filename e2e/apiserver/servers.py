"""Real servers for the stand-in tests, started like the Rust tests start them: PostgreSQL 15
on a free 127.0.0.1 port in a temporary folder (as the `postgres` user when run as root),
stopped by PID; a missing installation fails the test with the command that installs it.
"""

from __future__ import annotations

import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from harness import free_port as _free_port, stop_process


def _pg_bin() -> pathlib.Path:
    for d in (os.environ.get("SOMA_PG_BIN"), "/usr/lib/postgresql/15/bin", "/usr/local/bin"):
        if d and (pathlib.Path(d) / "initdb").exists() and (pathlib.Path(d) / "postgres").exists():
            return pathlib.Path(d)
    pytest.fail("PostgreSQL is not installed: run scripts/test-deps/servers.sh")


class Postgres:
    """One PostgreSQL server; `url` reaches database `postgres` as user `soma` (trust)."""

    def __init__(self, workdir: pathlib.Path):
        self.bin = _pg_bin()
        # Its own folder under /tmp: the `postgres` user cannot enter pytest's (0700, root's).
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="soma-pg-"))
        self.data = self.dir / "data"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.user = None
        if os.getuid() == 0:
            pw = pwd.getpwnam("postgres")
            self.user = (pw.pw_uid, pw.pw_gid)
            shutil.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "soma", "--no-sync"])
        self.workdir = workdir
        self.url = f"postgres://soma@127.0.0.1:{self.port}/postgres"
        self.start()

    def start(self) -> None:
        """Starts the server on its data and port (again, after `interrupt`)."""
        workdir = self.workdir
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.dir),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
            stdout=subprocess.DEVNULL, stderr=open(workdir / "pg.log", "ab"), preexec_fn=self._demote())
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"PostgreSQL did not start: {(workdir / 'pg.log').read_text()}")
                time.sleep(0.1)
        time.sleep(0.3)  # accepting TCP a moment before accepting logins

    def _demote(self):
        if self.user is None:
            return None
        uid, gid = self.user

        def demote() -> None:
            os.setgid(gid)
            os.setuid(uid)
        return demote

    def _run(self, args: list[str]) -> None:
        out = subprocess.run(args, capture_output=True, preexec_fn=self._demote())
        assert out.returncode == 0, out.stderr.decode()

    def sql(self, query: str) -> str:
        """Runs `query` with psql and returns its unaligned output."""
        psql = self.bin / "psql" if (self.bin / "psql").exists() else shutil.which("psql")
        assert psql, "psql is not installed: run scripts/test-deps/servers.sh"
        out = subprocess.run([str(psql), self.url, "-At", "-c", query], capture_output=True)
        assert out.returncode == 0, out.stderr.decode()
        return out.stdout.decode().strip()

    def interrupt(self) -> None:
        """An outage: stops the server (fast shutdown), keeping its data for `start`."""
        stop_process(self.proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait on the port, not the PID
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                time.sleep(0.1)
            except OSError:
                return

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def _nats_bin() -> str:
    for candidate in (os.environ.get("SOMA_NATS_SERVER"), shutil.which("nats-server"), "/usr/sbin/nats-server"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("nats-server is not installed: run scripts/test-deps/servers.sh")


class Nats:
    """One nats-server with JetStream on a free 127.0.0.1 port, its store in a temporary folder."""

    def __init__(self, workdir: pathlib.Path):
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="soma-nats-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen([_nats_bin(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=open(workdir / "nats.log", "wb"))
        self.url = f"nats://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"nats-server did not start: {(workdir / 'nats.log').read_text()}")
                time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


def _bao_bin() -> str:
    for candidate in (os.environ.get("SOMA_BAO"), shutil.which("bao")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("OpenBao is not installed: run scripts/test-deps/servers.sh and export its SOMA_BAO")


class Bao:
    """One OpenBao dev server (`bao server -dev`, the Vault API) on a free 127.0.0.1 port, root
    token `root`, stopped by PID; `api` calls its HTTP API as root."""

    ROOT = "root"

    def __init__(self, workdir: pathlib.Path):
        import requests
        self.dir = workdir / "bao"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.log_path = self.dir / "bao.log"
        self.proc = subprocess.Popen(
            [_bao_bin(), "server", "-dev", f"-dev-listen-address=127.0.0.1:{self.port}",
             f"-dev-root-token-id={self.ROOT}", "-dev-no-store-token"],
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.dir, env=dict(os.environ, HOME=str(self.dir)))
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{self.addr}/v1/sys/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"bao server did not start:\n{self.log_path.read_text(errors='replace')}")
            time.sleep(0.1)

    def api(self, method: str, path: str, body: dict | None = None, expect: tuple[int, ...] = (200, 204)) -> dict:
        import requests
        r = requests.request(method, f"{self.addr}/v1/{path}", json=body, timeout=10,
                             headers={"X-Vault-Token": self.ROOT})
        assert r.status_code in expect, f"{method} {path}: {r.status_code} {r.text}"
        return r.json() if r.content else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
