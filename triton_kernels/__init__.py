"""Triton kernels, one module per op family; installed as ``rlhfkern.triton_kernels`` (triton
itself ships a top-level package named ``triton_kernels``). Imported lazily by rlhfkern.ops."""
