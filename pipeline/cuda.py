"""The CUDA copy path: pinned (registered) shared memory, copies on a side stream, events.

Only the engine's CUDA path imports this; it references no engine, so the engine's finalizer
can release it (unregister the memory) before the shared segment is unmapped.
"""

from __future__ import annotations

import contextlib

import torch
from tensordict import TensorDict


class CudaPath:
    """Host <-> device traffic of one engine.

    Example:
        >>> cuda = CudaPath(torch.device("cuda"), shm.address, layout.nbytes)
        >>> dev_td, copied = cuda.to_device(td)   # queued on the side stream
        >>> cuda.wait(copied)                      # the compute stream waits, not the host
    """

    def __init__(self, device: torch.device, address: int, nbytes: int) -> None:
        self.device = device
        self.address = address
        cudart = torch.cuda.cudart()
        # Register the whole shared segment so every H2D/D2H copy is a true async DMA.
        err = cudart.cudaHostRegister(address, nbytes, 0)
        self.registered = int(err) == 0 if not isinstance(err, tuple) else int(err[0]) == 0
        self.copy_stream = torch.cuda.Stream(device)
        self.done = torch.cuda.Event()

    def to_device(self, td: TensorDict, profiler=None) -> tuple[TensorDict, torch.cuda.Event]:
        """Queue the batch's host-to-device copy on the side stream and return it with the
        event that marks its end. Nothing blocks: a copy queued while another stage computes
        runs concurrently with that compute. ``profiler`` (a running ProfileSession) records
        the copy's device interval."""
        with torch.cuda.stream(self.copy_stream):
            start = profiler.cuda_mark() if profiler else None
            dev = td.to(self.device, non_blocking=self.registered)
            copied = torch.cuda.Event(enable_timing=profiler is not None)
            copied.record(self.copy_stream)
        if profiler:
            profiler.cuda_interval("h2d", start, copied)
        return dev, copied

    def wait(self, copied: torch.cuda.Event) -> None:
        """Make the compute stream wait for a batch's copy (the host does not wait)."""
        torch.cuda.current_stream(self.device).wait_event(copied)

    def to_host(self, host: torch.Tensor, chunk: torch.Tensor) -> None:
        """Copy a device tensor into (registered) shared memory and wait for it."""
        host.copy_(chunk, non_blocking=self.registered)
        self.done.record(torch.cuda.current_stream(self.device))
        self.done.synchronize()

    def release(self) -> None:
        """Unregister the shared memory. Must run before the segment is unmapped."""
        if self.registered:
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
                torch.cuda.cudart().cudaHostUnregister(self.address)
            self.registered = False
