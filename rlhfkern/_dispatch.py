"""Backend choice, shared by every op (DESIGN.md, "Ops: one contract, several backends").

    backend = None -> $RLHFKERN_BACKEND, else "auto"
    "auto"         -> CPU tensors: "cpu" if the extension loaded, else "torch";
                      CUDA tensors: "cuda" if built with CUDA, else "triton", else "torch"
    "torch"        -> the reference itself (pure torch, any device)
    "cpu"          -> C++ kernels of rlhfkern._C, CPU tensors
    "cuda"         -> CUDA kernels of rlhfkern._C, CUDA tensors
    "triton"       -> Triton kernels, CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)
A backend that cannot run raises a ValueError that says what is missing.
"""

import importlib
import importlib.util
import os

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")
ENV_VAR = "RLHFKERN_BACKEND"


def _load_extension():
    """(module, None) or (None, reason)."""
    try:
        return importlib.import_module("rlhfkern._C"), None
    except ImportError as e:  # not built, or built against another torch
        return None, f"rlhfkern._C failed to import ({e}); build it with `pip install --no-build-isolation -e .`"


# Decided once at import, so that torch.compile traces the backend choice as constants.
_EXTENSION, EXTENSION_ERROR = _load_extension()


def _parse_build_info(text):
    """torch.ops.rlhfkern.build_info()'s "key=value" lines -> dict (flags as bools)."""
    info = dict(line.split("=", 1) for line in text.splitlines())
    return {k: (v == "1") if k in ("cpu", "cuda", "openmp") else v for k, v in info.items()}


_BUILD_INFO = (_parse_build_info(torch.ops.rlhfkern.build_info()) if _EXTENSION is not None
               else {"cpu": False, "cuda": False, "cuda_arches": "", "openmp": False})
# found, not imported: TRITON_INTERPRET must still be settable after `import rlhfkern`
TRITON_ERROR = (None if importlib.util.find_spec("triton") is not None
                else "triton is not installed (pip install 'rlhfkern[triton]')")


def extension():
    return _EXTENSION


def build_info():
    return dict(_BUILD_INFO)


def triton_interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend, device_type):
    """None if `backend` can run on tensors of `device_type` here, else the reason."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, got {device_type} tensors"
        return EXTENSION_ERROR
    if backend == "cuda":
        if device_type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, got {device_type} tensors"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        reason = EXTENSION_ERROR
        if reason is None and not _BUILD_INFO["cuda"]:
            reason = "rlhfkern._C was built without CUDA (torch without CUDA, or nvcc not found at build time)"
        return reason
    if backend == "triton":
        reason = TRITON_ERROR
        if reason is None and device_type == "cpu" and not triton_interpreted():
            reason = "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        elif reason is None and device_type not in ("cpu", "cuda"):
            reason = f"backend 'triton' does not run on {device_type} tensors"
        return reason
    raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")


def backends():
    """The backends usable here: "torch" always, then those whose device and build are present."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(why_unavailable(b, d) is None for d in device_types)]


def resolve(backend, device, op_backends=BACKENDS, gpu_order=("cuda", "triton")):
    """The concrete backend an op runs for `backend` (None/"auto"/name) on tensors on `device`.
    `op_backends`: the backends the op has (an op without a CUDA kernel runs Triton on GPUs);
    `gpu_order`: which of its GPU kernels "auto" tries first (the faster one, as measured).
    A backend named in the environment that the op lacks means "auto" for that op; one named
    in the call must exist."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or "auto"
        if backend in BACKENDS and backend not in op_backends:
            backend = "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    device_type = torch.device(device).type
    if backend == "auto":
        order = (*gpu_order, "torch") if device_type == "cuda" else ("cpu", "torch")
        return next(b for b in order if b in op_backends and why_unavailable(b, device_type) is None)
    if backend not in op_backends:
        raise ValueError(f"backend {backend!r} is not available for this op: it has {op_backends}")
    reason = why_unavailable(backend, device_type)
    if reason is not None:
        raise ValueError(f"backend {backend!r} is not available: {reason}")
    return backend
