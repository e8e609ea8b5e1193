"""Build of rlhfkern and its compiled core rlhfkern._C.

Sources come from the layout itself (CMakeLists.txt globs the same folders): csrc/registration.cpp
and csrc/cpu/*.cpp always; csrc/cuda/*.cu and csrc/cuda/bindings.cpp when the installed torch has
CUDA and nvcc is found (arches from TORCH_CUDA_ARCH_LIST). Build with
`pip install --no-build-isolation -e .` against the installed torch.
"""

import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

BASE_VERSION = "0.1.0"


def cpu_sources():
    return ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))


def cuda_sources():
    return sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/bindings.cpp"]


def with_cuda():
    if os.environ.get("RLHFKERN_NO_CUDA") == "1":
        return False
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    return torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)


def local_version(cuda):
    """The wheel's local version label: RLHFKERN_LOCAL_VERSION when set (make wheels: e.g.
    "cu130.torch2.14"; empty = unlabelled, the PyPI build), else cpu / cu<major><minor>."""
    label = os.environ.get("RLHFKERN_LOCAL_VERSION")
    if label is not None:
        return label
    return "cpu" if not cuda else "cu" + torch.version.cuda.replace(".", "")


def torch_requirement():
    """RLHFKERN_TORCH_REQUIREMENT (make wheels pins the torch minor the wheel was built against:
    the compiled core links its C++ ABI), else any torch the sources support."""
    return os.environ.get("RLHFKERN_TORCH_REQUIREMENT", "torch>=2.6")


# Python's limited API (3.10+): one cp310-abi3 wheel per (torch, CUDA) serves every Python from 3.10
LIMITED_API = [("Py_LIMITED_API", "0x030A0000")]


def extension():
    cuda = with_cuda()
    cxx = ["-O3", "-g0", "-fopenmp"]  # the C++ standard: what this torch asks for
    if not cuda:
        return CppExtension("rlhfkern._C", cpu_sources(), extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"], py_limited_api=True, define_macros=LIMITED_API), cuda
    arches = os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPUs")
    defines = ["-DRLHFKERN_WITH_CUDA", f'-DRLHFKERN_CUDA_ARCHS="{arches}"']
    return CUDAExtension(
        "rlhfkern._C",
        cpu_sources() + cuda_sources(),
        include_dirs=[os.path.abspath("csrc/cuda")],
        extra_compile_args={"cxx": cxx + defines, "nvcc": ["-O3", "-lineinfo"] + defines},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
        define_macros=LIMITED_API,
    ), cuda


ext, cuda = extension()
label = local_version(cuda)
setup(
    version=BASE_VERSION + (f"+{label}" if label else ""),
    install_requires=[torch_requirement(), "numpy"],
    packages=["rlhfkern", "rlhfkern.ops", "rlhfkern.compat", "rlhfkern.reshard", "rlhfkern.sched",
              "rlhfkern.triton_kernels"],
    package_data={"rlhfkern.sched": ["configs/*.yaml"]},
    package_dir={"rlhfkern.triton_kernels": "triton_kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
