"""The peers' released test files, fetched once into a cache (.peer_tests/, ignored by git; never
committed: the peers' code stays theirs).

    verl 0.9.1      tests/ of its PyPI sdist (pip download --no-binary :all: verl==0.9.1)
    OpenRLHF 0.11.2 tests/ shipped in its PyPI wheel, with the wheel's openrlhf/ beside it (the
                    tests load OpenRLHF's files from ../openrlhf by path)
    TRL 1.16.0      the repository's tests/: the PyPI sdist has none (checked on every fetch), so
                    the tag's tarball from GitHub (codeload), else raw.githubusercontent.com file by
                    file, else a local copy of TRL's repository named by PEER_TRL_SRC (a folder
                    holding tests/, or a .tar.gz of one; a git checkout gives its commit): for a
                    machine that cannot reach GitHub. What was used is recorded in SOURCE.json
                    beside the files, and in the tier's report.

`python tests/tier_peers/fetch.py` fetches all three and prints where they came from."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PEER_TESTS_DIR", ROOT / ".peer_tests"))

VERL, OPENRLHF, TRL = "0.9.1", "0.11.2", "1.16.0"
TRL_TAG = "v" + TRL
TRL_CODELOAD = f"https://codeload.github.com/huggingface/trl/tar.gz/refs/tags/{TRL_TAG}"
TRL_RAW = f"https://raw.githubusercontent.com/huggingface/trl/{TRL_TAG}/"
# the files of TRL's tests/ the tier needs when it must fetch file by file
TRL_RAW_FILES = ("tests/__init__.py", "tests/conftest.py", "tests/testing_utils.py", "tests/testing_constants.py",
                 "tests/test_utils.py", "tests/test_kernels.py")


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _pip_download(spec, dest, *args):
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest), *args, spec]
    subprocess.run(cmd, check=True)
    name, version = spec.split("==")
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(f"{name}_{version}".lower())
             or p.name.lower().startswith(f"{name}-{version}".lower())]
    if not found:
        raise RuntimeError(f"pip download {spec}: no archive in {dest}")
    return found[0]


def _done(peer):
    source = CACHE / peer / "SOURCE.json"
    return json.loads(source.read_text()) if source.exists() else None


def _finish(peer, source, started):
    source["fetch_seconds"] = round(time.time() - started, 1)
    (CACHE / peer / "SOURCE.json").write_text(json.dumps(source, indent=1) + "\n")
    return source


def _extract_tar(archive, dest, keep):
    """Members of a .tar.gz whose path (less the top folder) starts with one of `keep`, into dest."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            if len(parts) < 2 or not parts[1].startswith(keep) or not (member.isfile() or member.isdir()):
                continue
            member.name = parts[1]
            tar.extract(member, dest, filter="data")


def fetch_verl():
    if (source := _done("verl")) is not None:
        return source
    started = time.time()
    archive = _pip_download(f"verl=={VERL}", CACHE / "downloads", "--no-binary", ":all:")
    dest = CACHE / "verl"
    shutil.rmtree(dest, ignore_errors=True)
    _extract_tar(archive, dest, ("tests/",))
    return _finish("verl", {"peer": "verl", "version": VERL, "source": f"PyPI sdist {archive.name}",
                            "sha256": _sha256(archive)}, started)


def fetch_openrlhf():
    if (source := _done("openrlhf")) is not None:
        return source
    started = time.time()
    # the wheel is tagged cp311 manylinux1 whatever Python runs this (its files are pure Python)
    archive = _pip_download(f"openrlhf=={OPENRLHF}", CACHE / "downloads", "--only-binary", ":all:",
                            "--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux1_x86_64")
    dest = CACHE / "openrlhf"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with zipfile.ZipFile(archive) as whl:
        for name in whl.namelist():
            # purelib/tests/... and openrlhf/...: the layout the tests expect (tests/../openrlhf)
            rel = re.sub(r"^openrlhf-[^/]+\.data/purelib/", "", name)
            if rel.startswith(("tests/", "openrlhf/")) and not name.endswith("/"):
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(whl.read(name))
    return _finish("openrlhf", {"peer": "openrlhf", "version": OPENRLHF, "source": f"PyPI wheel {archive.name}",
                                "sha256": _sha256(archive)}, started)


def _get(url, timeout=30):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _local_trl(path, tried):
    """A local copy of TRL's repository (a folder holding tests/, or a .tar.gz of one)."""
    path = Path(path).resolve()
    dest = CACHE / "trl"
    shutil.rmtree(dest, ignore_errors=True)
    if path.is_dir():
        shutil.copytree(path / "tests", dest / "tests")
        tree, commit = path, None
        try:
            commit = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            pass
        version = (path / "VERSION").read_text().strip() if (path / "VERSION").exists() else "unknown"
    else:
        _extract_tar(path, dest, ("tests/", "VERSION"))
        version = (dest / "VERSION").read_text().strip() if (dest / "VERSION").exists() else "unknown"
        tree, commit = path, None
        with tarfile.open(path) as tar:  # git archive writes the commit into the pax header
            commit = tar.pax_headers.get("comment")
    return {"peer": "trl", "version": version, "wanted": TRL,
            "source": f"local copy of TRL's repository (PEER_TRL_SRC={tree})"
                      + (f", commit {commit}" if commit else ""),
            "sha256": _sha256(path) if path.is_file() else None, "tried": tried}


def fetch_trl():
    if (source := _done("trl")) is not None:
        return source
    started = time.time()
    tried = []
    # 1. PyPI's sdist: does it ship tests/?
    sdist = _pip_download(f"trl=={TRL}", CACHE / "downloads", "--no-binary", ":all:")
    with tarfile.open(sdist) as tar:
        has_tests = any(m.name.split("/", 1)[-1].startswith("tests/test_") for m in tar.getmembers())
    tried.append(f"PyPI sdist {sdist.name}: " + ("has tests/" if has_tests else "no tests/"))
    dest = CACHE / "trl"
    if has_tests:
        shutil.rmtree(dest, ignore_errors=True)
        _extract_tar(sdist, dest, ("tests/",))
        return _finish("trl", {"peer": "trl", "version": TRL, "source": f"PyPI sdist {sdist.name}",
                               "sha256": _sha256(sdist), "tried": tried}, started)
    # 2. the tag's tarball from GitHub
    try:
        data = _get(TRL_CODELOAD)
        archive = CACHE / "downloads" / f"trl-{TRL_TAG}.tar.gz"
        archive.write_bytes(data)
        shutil.rmtree(dest, ignore_errors=True)
        _extract_tar(archive, dest, ("tests/",))
        return _finish("trl", {"peer": "trl", "version": TRL, "source": TRL_CODELOAD, "sha256": _sha256(archive),
                               "tried": tried}, started)
    except OSError as e:
        tried.append(f"{TRL_CODELOAD}: {e}")
    # 3. file by file from raw.githubusercontent.com
    try:
        files = {f: _get(TRL_RAW + f) for f in TRL_RAW_FILES}
        shutil.rmtree(dest, ignore_errors=True)
        for f, data in files.items():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            (dest / f).write_bytes(data)
        return _finish("trl", {"peer": "trl", "version": TRL, "source": TRL_RAW + "{" + ",".join(TRL_RAW_FILES) + "}",
                               "tried": tried}, started)
    except OSError as e:
        tried.append(f"{TRL_RAW}: {e}")
    # 4. a local copy
    local = os.environ.get("PEER_TRL_SRC")
    if local:
        return _finish("trl", _local_trl(local, tried), started)
    raise SystemExit("test-peers: TRL's repository tests could not be fetched:\n  " + "\n  ".join(tried) +
                     f"\nSet PEER_TRL_SRC to a local copy of TRL's repository ({TRL_TAG}, or the nearest you have: "
                     "a folder with tests/, or a .tar.gz of one, e.g. `git archive`).")


def fetch_all(peers=("verl", "openrlhf", "trl")):
    CACHE.mkdir(parents=True, exist_ok=True)
    fetchers = {"verl": fetch_verl, "openrlhf": fetch_openrlhf, "trl": fetch_trl}
    return {peer: fetchers[peer]() for peer in peers}


if __name__ == "__main__":
    print(json.dumps(fetch_all(), indent=1))
