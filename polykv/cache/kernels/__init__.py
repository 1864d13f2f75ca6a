"""Kernels: Triton programs for the cache's hot paths on CUDA, each with a PyTorch reference."""
