"""Host values onto the device without stalling the host.

A plain ``torch.tensor(values, device="cuda")`` copies from pageable memory and then waits for the
stream, so every small index or parameter tensor built mid-step is a host sync. Here host data goes
through pinned memory with a non-blocking copy: the host enqueues it and moves on. The pinned block
comes from torch's caching host allocator, which does not hand it out again until the copy that read
it has finished, so the host may build the next step's data at once. On a CPU "device" the host
values are the device values and nothing is copied (numpy arrays are shared, not copied).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


_CPU = torch.device("cpu")  # (compared against: a device's .type builds a new string on each read)
_NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.bool: np.bool_}


def to_device(values: Sequence | np.ndarray | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor of ``dtype`` on ``device``; from pinned memory, non-blocking, on CUDA."""
    if isinstance(values, (list, tuple)) and dtype in _NUMPY_DTYPES:
        # numpy reads a list of Python numbers about 3x faster than torch.as_tensor does (a few
        # hundred ids per step, several times a step), and torch shares numpy's buffer.
        host = torch.from_numpy(np.array(values, dtype=_NUMPY_DTYPES[dtype]))
    elif isinstance(values, np.ndarray) and dtype in _NUMPY_DTYPES:
        # Shared when of the right dtype, else converted by numpy: a few times faster than
        # as_tensor with a dtype for the short arrays a step builds.
        wanted = _NUMPY_DTYPES[dtype]
        host = torch.from_numpy(values if values.dtype == wanted else values.astype(wanted))
    else:
        host = torch.as_tensor(values, dtype=dtype)
    if device == _CPU:
        return host
    if device.type == "cuda":
        pinned = torch.empty(host.shape, dtype=dtype, pin_memory=True)
        pinned.copy_(host)
        return pinned.to(device, non_blocking=True)
    return host.to(device)
