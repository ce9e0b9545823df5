"""Block ids chosen by retrieval on the device, on their way to the host that keeps the block cache's books."""

from __future__ import annotations

import torch


class BlockIds:
    """Block ids chosen on the device, on their way to the host (which keeps the cache's books).

    On CUDA the copy goes into pinned memory asynchronously and an event marks its end, so `tolist` waits for
    this copy only, not for device work enqueued after it; elsewhere this wraps the tensor itself.
    """

    def __init__(self, ids: torch.Tensor):
        self.dim = ids.dim()
        self._ready = None
        if ids.device.type == "cuda":
            self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self._host.copy_(ids, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(ids.device))
        else:
            self._host = ids

    def tolist(self) -> list:
        return self.tensor().tolist()

    def tensor(self) -> torch.Tensor:
        """The ids on the host (waits for their copy on CUDA)."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._host
