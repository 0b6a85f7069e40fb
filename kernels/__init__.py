"""Fused kernels for Balcony Serve's decoder layers, with torch references and one dispatch point.

This package imports only torch and triton. It deliberately defines no ``__version__``: transformers
probes for a Hugging Face package also importable as ``kernels`` and must never take ours for it
(see tests/kernels/test_package_identity.py).
"""

from kernels.dispatch import KernelOps, select_ops

__all__ = ["KernelOps", "select_ops"]
