#!/usr/bin/env python3
"""Builds one image's root filesystem as a reproducible tar layer: the binary (debug info
stripped), exactly the shared libraries its ELF `NEEDED` entries reach (from the pinned Debian
packages unpacked in BASE), the CA bundle, a non-root user, and the Debian copyright files of
what it holds. Every entry is owned by 0:0 with its mtime at SOURCE_DATE_EPOCH, in sorted
order, so the same inputs give the same bytes.

Usage: rootfs.py BINARY NAME BASE OUT.tar     (SOURCE_DATE_EPOCH in the environment)
"""

from __future__ import annotations

import io
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

UID = 65532
LIBDIR = "lib/x86_64-linux-gnu"
LOADER = "ld-linux-x86-64.so.2"


def needed(path: pathlib.Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].split("]", 1)[0] for line in out.splitlines() if "(NEEDED)" in line]


def find(base: pathlib.Path, name: str) -> pathlib.Path:
    for d in (base / "lib/x86_64-linux-gnu", base / "usr/lib/x86_64-linux-gnu"):
        if (d / name).exists():
            return d / name
    raise SystemExit(f"rootfs: {name} is not in the pinned base packages")


def closure(binary: pathlib.Path, base: pathlib.Path) -> dict[str, pathlib.Path]:
    libs: dict[str, pathlib.Path] = {LOADER: find(base, LOADER)}
    todo = needed(binary)
    while todo:
        name = todo.pop()
        if name in libs:
            continue
        libs[name] = find(base, name)
        todo.extend(needed(libs[name].resolve()))
    return libs


def main() -> None:
    binary, name, base, out = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3]), pathlib.Path(sys.argv[4])
    epoch = int(os.environ["SOURCE_DATE_EPOCH"])
    entries: dict[str, tuple[str, bytes | str, int]] = {}  # path -> (type, data or link target, mode)

    def add_dirs(path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            entries.setdefault("/".join(parts[:i]), ("dir", b"", 0o755))

    def add_file(path: str, data: bytes, mode: int = 0o644) -> None:
        add_dirs(path)
        entries[path] = ("file", data, mode)

    def add_link(path: str, target: str) -> None:
        add_dirs(path)
        entries[path] = ("link", target, 0o777)

    with tempfile.TemporaryDirectory() as tmp:
        stripped = pathlib.Path(tmp) / name
        subprocess.run(["objcopy", "--strip-debug", str(binary), str(stripped)], check=True)
        add_file(f"usr/bin/{name}", stripped.read_bytes(), 0o755)
    for lib, path in sorted(closure(binary, base).items()):
        add_file(f"{LIBDIR}/{lib}", path.resolve().read_bytes(), 0o755)
    add_link(f"lib64/{LOADER}", f"/{LIBDIR}/{LOADER}")
    certs = sorted((base / "usr/share/ca-certificates/mozilla").glob("*.crt"))
    assert certs, "no CA certificates in the base"
    add_file("etc/ssl/certs/ca-certificates.crt", b"".join(c.read_bytes().rstrip(b"\n") + b"\n" for c in certs))
    # OpenSSL's default paths (Debian's OPENSSLDIR) point at the bundle.
    add_link("usr/lib/ssl/cert.pem", "/etc/ssl/certs/ca-certificates.crt")
    add_link("usr/lib/ssl/certs", "/etc/ssl/certs")
    add_file("etc/passwd", f"root:x:0:0:root:/root:/sbin/nologin\nsoma:x:{UID}:{UID}:soma:/nonexistent:/sbin/nologin\n".encode())
    add_file("etc/group", f"root:x:0:\nsoma:x:{UID}:\n".encode())
    add_file("etc/nsswitch.conf", b"hosts: files dns\n")
    entries["tmp"] = ("dir", b"", 0o1777)
    for pkg in ("libc6", "gcc-12-base", "libssl3", "ca-certificates"):
        add_file(f"usr/share/doc/{pkg}/copyright", (base / f"usr/share/doc/{pkg}/copyright").read_bytes())

    with open(out, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(entries):
            kind, data, mode = entries[path]
            info = tarfile.TarInfo(path)
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = epoch, 0, 0, "", "", mode
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            else:
                assert isinstance(data, bytes)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


if __name__ == "__main__":
    main()
