"""Soma's images, as scripts/release builds them: reproducible, pushed to a real registry, signed by
the real cosign, verified by Soma's own verifier, and checked by the chart's verify-images init
container.

    scripts/release ×2 ──umoci──▶ OCI layouts (same digests) ──skopeo──▶ docker-registry (127.0.0.1)
                                                                 ▲ cosign sign --key
    soma image verify (soma-signatures) ◀── the chart's verify-images args (helm template) ──┘

The images are built from the binaries this tree's build produced (`--binaries`, the debug build
scripts/test makes: a release build would add minutes to every run; the image pipeline is the
same). Each image is unpacked and its binary run in a chroot as uid 65532, so the image holds
every file it needs and nothing runs as root.

Needs SOMA_OPERATOR_BIN (its folder holds soma-proxy and soma too), SOMA_CLI_BIN, SOMA_UMOCI,
SOMA_SKOPEO, the signing tools and helm; run as root (chroot).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
from typing import Any, Iterator

import pytest
import yaml

import signing
from harness import REPO
from signing import Registry, Workdir

BIN_DIR = pathlib.Path(os.environ.get("SOMA_OPERATOR_BIN", "/nonexistent")).parent
CLI = os.environ.get("SOMA_CLI_BIN", "")
NAMES = ("soma-operator", "soma-proxy", "soma")


def need(var: str) -> str:
    path = os.environ.get(var, "")
    assert path and os.access(path, os.X_OK), f"{var} is not an executable (scripts/test-deps/*.sh print it)"
    return path


def release(work: Workdir, registry: Registry, out: pathlib.Path) -> dict[str, tuple[str, int]]:
    cache = os.environ.get("SOMA_CACHE") or str(pathlib.Path.home() / ".cache" / "soma")  # the pinned base, kept
    env = dict(os.environ, HOME=str(work.path), DOCKER_CONFIG=str(work.path), COSIGN_PASSWORD=signing.PASSWORD,
               SOMA_CACHE=cache, **PINNED,
               SOMA_UMOCI=need("SOMA_UMOCI"), SOMA_SKOPEO=need("SOMA_SKOPEO"), SOMA_COSIGN=need("SOMA_COSIGN"))
    done = subprocess.run([str(REPO / "scripts" / "release"), "--registry", f"{registry.addr}/soma",
                           "--key", str(work.path / "release.key"), "--binaries", str(BIN_DIR),
                           "--insecure", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    images = {}
    for line in done.stdout.splitlines():
        if line.startswith("IMAGE "):
            _, name, ref, size = line.split()
            images[name] = (ref, int(size))
    assert set(images) == set(NAMES), done.stdout
    return images


def verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "image", "verify", *args], capture_output=True, text=True, timeout=120)


# One source date and revision for both builds (a commit made while the tests run must not
# change them).
PINNED = {"SOURCE_DATE_EPOCH": subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%ct"], capture_output=True,
                                              text=True).stdout.strip() or "0",
          "SOMA_RELEASE_REVISION": subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                                  text=True).stdout.strip() or "unknown"}


@pytest.fixture(scope="module")
def released(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tools = signing.tools()
    assert tools is not None, "SOMA_COSIGN, SOMA_ORAS and SOMA_REGISTRY must be set (scripts/test-deps/signing-tools.sh)"
    for b in NAMES:
        assert os.access(BIN_DIR / b, os.X_OK), f"no {BIN_DIR / b}: SOMA_OPERATOR_BIN must point into a built tree"
    assert CLI and os.access(CLI, os.X_OK), "SOMA_CLI_BIN is not an executable"
    tmp = tmp_path_factory.mktemp("release")
    registry = Registry(tools, tmp / "registry")
    try:
        work = Workdir(tools, tmp / "keys")
        work.key_pair("release")
        first = release(work, registry, tmp / "out1")
        second = release(work, registry, tmp / "out2")
        yield {"tools": tools, "registry": registry, "work": work, "first": first, "second": second, "tmp": tmp}
    finally:
        registry.stop()


def test_two_builds_give_the_same_digests_and_every_image_is_signed(released: dict[str, Any]) -> None:
    first, second, work, registry = released["first"], released["second"], released["work"], released["registry"]
    assert {n: r for n, (r, _) in first.items()} == {n: r for n, (r, _) in second.items()}, (first, second)
    for name, (ref, size) in first.items():
        repo, digest = ref.split("@")
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), ref
        assert work.verify("release", registry.addr, repo.split("/", 1)[1], digest), f"cosign rejects {ref}"
        print(f"{name}: {ref} ({size / 1e6:.1f} MB compressed)")
    refs = [ref for ref, _ in first.values()]
    ok = verify("--require-digest", "--key", str(work.path / "release.pub"), "--insecure-registry", registry.addr, *refs)
    assert ok.returncode == 0 and ok.stdout.count("verified ") == 3, ok.stdout + ok.stderr
    # Another key, an unsigned image and a tag are refused.
    work.key_pair("other")
    wrong = verify("--key", str(work.path / "other.pub"), "--insecure-registry", registry.addr, refs[0])
    assert wrong.returncode == 1 and "(WrongKey)" in wrong.stdout, wrong.stdout + wrong.stderr
    unsigned = work.push(registry.addr, "soma/soma-proxy", "unsigned", b'{"not": "signed"}')
    bare = verify("--key", str(work.path / "release.pub"), "--insecure-registry", registry.addr,
                  f"{registry.addr}/soma/soma-proxy@{unsigned}")
    assert bare.returncode == 1 and "(Unsigned)" in bare.stdout, bare.stdout + bare.stderr
    tagged = verify("--require-digest", "--key", str(work.path / "release.pub"), f"{registry.addr}/soma/soma:0.1.0")
    assert tagged.returncode == 2 and "no digest" in tagged.stderr, tagged.stderr


def test_each_image_runs_its_binary_as_a_non_root_user_from_its_own_files(released: dict[str, Any]) -> None:
    assert os.geteuid() == 0, "unpacking an image and running it in a chroot needs root"
    umoci = need("SOMA_UMOCI")
    out = released["tmp"] / "out1"
    for name, args in (("soma-operator", ["--help"]), ("soma-proxy", ["--help"]), ("soma", ["--version"])):
        bundle = released["tmp"] / f"bundle-{name}"
        shutil.rmtree(bundle, ignore_errors=True)
        subprocess.run([umoci, "unpack", "--image", f"{out / name}:0.1.0", str(bundle)], check=True,
                       capture_output=True)
        config = json.loads((bundle / "config.json").read_text())
        assert config["process"]["user"]["uid"] == 65532 and config["process"]["user"]["gid"] == 65532, config["process"]
        assert config["process"]["args"][0] == f"/usr/bin/{name}", config["process"]["args"]
        rootfs = bundle / "rootfs"
        files = sorted(str(p.relative_to(rootfs)) for p in rootfs.rglob("*") if p.is_file() or p.is_symlink())
        assert not any(f.startswith(("bin/sh", "usr/bin/sh", "bin/bash")) for f in files), "a shell in the image"
        ran = subprocess.run(["chroot", "--userspec=65532:65532", str(rootfs), f"/usr/bin/{name}", *args],
                             capture_output=True, text=True, timeout=30)
        assert ran.returncode == 0, (name, ran.stdout, ran.stderr, files)


def render(values: list[str]) -> list[dict[str, Any]]:
    helm = shutil.which("helm") or str(pathlib.Path.home() / ".cache/soma/tools/bin/helm")
    done = subprocess.run([helm, "template", "soma", str(REPO / "charts" / "soma"), "-n", "soma-system", *values],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_the_charts_verify_images_init_container_accepts_the_release_and_refuses_a_swapped_image(
        released: dict[str, Any]) -> None:
    tmp, registry, work = released["tmp"], released["registry"], released["work"]
    values = ["-f", str(tmp / "out1" / "release-values.yaml"), "--set", "imageSignatures.required=true",
              "--set", "imageSignatures.keys.configMap=image-signers", "--set-json", 'imageSignatures.keys.items=["cosign.pub"]',
              "--set-json", f'signatures.insecureRegistries=["{registry.addr}"]']

    def init_container(docs: list[dict[str, Any]]) -> tuple[list[str], str]:
        deploy = next(d for d in docs if d["kind"] == "Deployment")
        init = next(c for c in deploy["spec"]["template"]["spec"]["initContainers"] if c["name"] == "verify-images")
        key = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-release-key"))
        return init["args"], key["data"]["cosign.pub"]

    def run(args: list[str], key: str) -> subprocess.CompletedProcess[str]:
        (tmp / "release-key.pub").write_text(key)
        args = [a.replace("/etc/soma/release/cosign.pub", str(tmp / "release-key.pub")) for a in args]
        assert args[:2] == ["image", "verify"], args
        return verify(*args[2:])

    docs = render(values)
    args, key = init_container(docs)
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    operator_image = deploy["spec"]["template"]["spec"]["containers"][0]["image"]
    assert operator_image == released["first"]["soma-operator"][0], "the chart runs the image it verified"
    ok = run(args, key)
    assert ok.returncode == 0 and ok.stdout.count("verified ") == 3, ok.stdout + ok.stderr

    unsigned = work.push(registry.addr, "soma/soma-proxy", "swapped", b'{"swapped": true}')
    swapped = render(values + ["--set", f"sidecar.image.digest={unsigned}"])
    args, key = init_container(swapped)
    refused = run(args, key)
    assert refused.returncode == 1 and "(Unsigned)" in refused.stdout, refused.stdout + refused.stderr
