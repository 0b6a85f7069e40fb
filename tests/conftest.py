"""Suite-wide settings that must hold before any test module imports triton or torch."""

import os

# Triton kernels run on CPU tensors through Triton's interpreter; the variable is read at import.
os.environ.setdefault("TRITON_INTERPRET", "1")
# No hub is reachable on these machines: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
