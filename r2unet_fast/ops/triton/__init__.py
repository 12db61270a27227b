"""Triton kernels and their launchers, one module per fused op.

Importing this package imports triton; :mod:`r2unet_fast.ops.dispatch` only
does so when a Triton backend is actually requested.
"""
