"""Triton kernels of the MoE program's stages (run under TRITON_INTERPRET=1 on CPU)."""
