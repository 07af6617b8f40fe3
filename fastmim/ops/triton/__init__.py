"""Triton kernels of fastmim.ops and their launchers (imported lazily: only CUDA tensors or TRITON_INTERPRET=1)."""
