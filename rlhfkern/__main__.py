"""`python -m rlhfkern info`: versions, what was built, which backends run here."""

import argparse
import platform
import sys

import torch

from . import __version__, _dispatch


def info():
    built = _dispatch.build_info()
    lines = [
        f"rlhfkern     {__version__}",
        f"python       {platform.python_version()}",
        f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
    ]
    try:
        import triton

        lines.append(f"triton       {triton.__version__}" + (" (interpreter)" if _dispatch.triton_interpreted() else ""))
    except ImportError:
        lines.append("triton       not installed")
    ext_error = _dispatch.EXTENSION_ERROR
    lines.append("extension    " + ("rlhfkern._C loaded" if ext_error is None else ext_error))
    lines.append(f"built        cpu={built['cpu']} openmp={built['openmp']} cuda={built['cuda']}"
                 + (f" arches={built['cuda_arches']}" if built["cuda"] else ""))
    lines.append(f"GPU          {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}")
    gpu = torch.cuda.is_available()
    for b, device in (("torch", "cpu"), ("cpu", "cpu"), ("triton", "cuda" if gpu else "cpu"), ("cuda", "cuda")):
        reason = _dispatch.why_unavailable(b, device)
        lines.append(f"backend {b:7s}" + (f"runs on {device} tensors" if reason is None else f"unavailable: {reason}"))
    lines.append(f"usable       {_dispatch.backends()}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m rlhfkern")
    parser.add_argument("command", choices=["info"])
    parser.parse_args(argv)
    print(info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
