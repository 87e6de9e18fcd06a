"""Kernels and their launchers: the torch path (any device) and, later, Triton kernels."""
