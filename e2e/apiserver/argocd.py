"""Runs Argo CD's health checks (charts/soma/argocd/*.lua) in a real Lua 5.1 interpreter, the
language gopher-lua (Argo CD's) implements, the way Argo CD calls them: the object as the global
table `obj`, the script's returned table `{status, message}` as the health.

    objects (JSON) ──to_lua──▶ one Lua program per script: for each object, obj = <table>;
                               hs = script() ──▶ "index<TAB>status<TAB>message" lines ──▶ Python

SOMA_LUA names the interpreter (scripts/test-deps/platform-tools.sh installs Debian's lua5.1);
a missing interpreter fails the test.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import tempfile
from typing import Any

from harness import REPO

SCRIPTS = REPO / "charts" / "soma" / "argocd"


def lua_binary() -> str:
    lua = os.environ.get("SOMA_LUA") or shutil.which("lua5.1")
    if not lua or not os.access(lua, os.X_OK):
        raise AssertionError("no Lua 5.1 interpreter: run scripts/test-deps/platform-tools.sh (SOMA_LUA)")
    out = subprocess.run([lua, "-v"], capture_output=True, text=True)
    assert "Lua 5.1" in out.stdout + out.stderr, f"{lua} is not Lua 5.1: {out.stdout}{out.stderr}"
    return lua


def _string(s: str) -> str:
    out = []
    for b in s.encode():
        if b in (34, 92) or b < 32 or b == 127:
            out.append(f"\\{b:03d}")
        else:
            out.append(chr(b))
    return '"' + "".join(out) + '"'


def to_lua(value: Any) -> str:
    """A Lua table constructor equal to the decoded JSON `value` (null is nil, arrays are 1-based)."""
    if value is None:
        return "nil"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "{" + ", ".join(to_lua(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{_string(k)}] = {to_lua(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"not JSON: {value!r}")


RUNNER = """
local script = assert(loadfile({script}))
local results = {{}}
local objects = {{
{objects}
}}
for i, o in ipairs(objects) do
  obj = o
  local ok, hs = pcall(script)
  if not ok then
    io.write(i, "\\tERROR\\t", string.format("%q", tostring(hs)):gsub("\\n", "n"), "\\n")
  elseif type(hs) ~= "table" then
    io.write(i, "\\tERROR\\t", "returned ", type(hs), "\\n")
  else
    io.write(i, "\\t", tostring(hs.status), "\\t", (tostring(hs.message):gsub("[\\n\\t]", " ")), "\\n")
  end
end
"""


def health(kind: str, objects: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(status, message) of each object, as Argo CD's health check for `kind` returns it."""
    if not objects:
        return []
    script = SCRIPTS / f"{kind.lower()}.lua"
    program = RUNNER.format(script=_string(str(script)),
                            objects=",\n".join(to_lua(o) for o in objects))
    with tempfile.NamedTemporaryFile("wb", suffix=".lua", delete=False) as f:
        f.write(program.encode())
        path = f.name
    try:
        out = subprocess.run([lua_binary(), path], capture_output=True, timeout=120)
    finally:
        pathlib.Path(path).unlink()
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    lines = out.stdout.decode().splitlines()
    assert len(lines) == len(objects), (len(lines), len(objects), out.stderr.decode())
    results = []
    for i, line in enumerate(lines, 1):
        index, status, message = line.split("\t", 2)
        assert int(index) == i
        results.append((status, message))
    return results
