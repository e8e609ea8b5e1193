"""The build: the torch-free CUDA kernels compile with plain nvcc (CMakeLists.txt, the check CI
runs without a GPU), and `python -m rlhfkern info` reports what was built."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_nvcc():
    for candidate in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        path = os.path.join(candidate, "bin", "nvcc")
        if candidate and os.path.exists(path):
            return path
    return shutil.which("nvcc")


def find_python(version):
    """A working `python<version>`: pyenv's build (its shims fail where pyenv picked another
    version) or the one on PATH."""
    import glob

    found = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")))
    for path in found[-1:] + [shutil.which(f"python{version}")]:
        if path and subprocess.run([path, "-c", "pass"], capture_output=True).returncode == 0:
            return path
    return None


def test_cuda_kernels_compile_with_plain_nvcc(tmp_path):
    nvcc = find_nvcc()
    if nvcc is None:
        # CI has nvcc: there the check must run, never skip
        assert os.environ.get("CI") != "true", "nvcc not found: the CUDA compile check cannot run"
        pytest.skip("nvcc not found on this machine")
    build = tmp_path / "cuda-check"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_CUDA_COMPILER={nvcc}", *generator],
                   check=True, capture_output=True, text=True)
    done = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    library = build / "librlhfkern_cuda_kernels.a"
    assert library.exists()
    # every .cu of csrc/cuda went in, for every arch of the list
    sources = sorted(f for f in os.listdir(os.path.join(ROOT, "csrc", "cuda")) if f.endswith(".cu"))
    members = subprocess.run(["ar", "t", str(library)], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(m[: -len(".o")] for m in members) == sources
    # the fatbinary names the SASS arches it carries
    blob = library.read_bytes()
    for arch in (b"sm_80", b"sm_90"):
        assert arch in blob, arch


def test_gpu_bundle_installs_into_the_gpu_images_python(tmp_path):
    """`make gpu-bundle` downloads the wheels the lent GPU image (CPython 3.12, no network)
    lacks; they install offline into a folder of their own, as bench/gpu_check.sh does, and
    import with that Python (the GPU itself cannot be checked here)."""
    py312 = find_python("3.12")
    if py312 is None:
        pytest.skip("no CPython 3.12 on this machine to install the bundle into")
    bundle, site = tmp_path / "bundle", tmp_path / "site"
    done = subprocess.run(["make", "--no-print-directory", "-C", ROOT, "gpu-bundle", f"GPU_BUNDLE_DIR={bundle}"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    wheels = sorted(bundle.glob("*.whl"))
    names = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
    assert {"pydantic", "pydantic-core", "pyyaml", "pytest-xdist", "pytest-timeout", "openrlhf"} <= names, names
    assert all("cp312" in w.name or "py3-none" in w.name or "py2.py3-none" in w.name for w in wheels), wheels
    subprocess.run([py312, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--disable-pip-version-check",
                    "--target", str(site), *map(str, wheels)], check=True, capture_output=True)
    code = "import pydantic, pydantic_core, yaml, execnet; print(pydantic.VERSION)"
    ran = subprocess.run([py312, "-c", code], env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert (site / "openrlhf" / "models" / "loss.py").exists()  # the module the drop-in tests compare with


def test_build_info_is_a_torch_op_and_parses():
    """The extension exposes what it was built with as the torch op rlhfkern::build_info (the
    module itself uses Python's limited API only); arch lists keep their ';'."""
    import torch

    from rlhfkern import _dispatch

    text = torch.ops.rlhfkern.build_info()
    assert _dispatch.build_info() == _dispatch._parse_build_info(text)
    assert _dispatch.build_info()["cpu"] is True
    assert _dispatch._parse_build_info("cpu=1\ncuda=1\ncuda_arches=7.5;8.0;12.0+PTX\nopenmp=0") == {
        "cpu": True, "cuda": True, "cuda_arches": "7.5;8.0;12.0+PTX", "openmp": False}
    so = [f for f in os.listdir(os.path.join(ROOT, "rlhfkern")) if f.startswith("_C")]
    assert so == ["_C.abi3.so"], so
