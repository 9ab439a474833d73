"""Big writes off the critical path: the reference's logits to disk and back, a chunk at a time.

A segment's float32 logits are gigabytes (4 bytes x vocabulary per token). Writing them must not
hold up the next pass, and neither a write nor a read may need a host copy of the whole tensor.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


class BackgroundWriter:
    """Runs file writes one after another in a thread, so the GPU goes on with the next pass.

    The reference logits of a segment are gigabytes: copying them to the host and writing them
    must not hold up the test dtypes. `join()` waits and re-raises the first error.
    """

    def __init__(self):
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], None]) -> None:
        previous = self._threads[-1] if self._threads else None

        def work():
            if previous is not None:
                previous.join()  # keep the order: a segment's marker after its logits
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised by join()
                with self._lock:
                    self._errors.append(exc)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        self._threads.append(t)

    def join(self) -> None:
        for t in self._threads:
            t.join()
        self._threads.clear()
        if self._errors:
            exc = self._errors[0]
            self._errors.clear()
            raise exc


_IO_CHUNK_BYTES = 256 * 2**20


def _staging(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, object]:
    """A pinned host buffer (fast copies, no pageable bounce) and a side stream, on CUDA."""
    if device.type != "cuda":
        return torch.empty((rows, cols), dtype=torch.float32), None
    return torch.empty((rows, cols), dtype=torch.float32, pin_memory=True), torch.cuda.Stream(device)


def write_logits(fh, buffer: torch.Tensor) -> None:
    """Write a float32 (N, V) tensor as a .npy file, a few hundred MB at a time.

    Runs in the background writer's thread: the device-to-host copy goes through one pinned
    buffer on a side stream (it overlaps the next pass's kernels), and each chunk is written with
    `fh.write`, which releases the GIL: the main thread's Python is not held up, and no host copy
    of the whole tensor (tens of GB) is ever made.
    """
    n, v = buffer.shape
    np.lib.format.write_array_header_2_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (n, v)})
    rows = max(1, _IO_CHUNK_BYTES // (4 * max(1, v)))
    if buffer.device.type != "cuda":
        for chunk in buffer.split(rows):
            fh.write(memoryview(chunk.contiguous().numpy()).cast("B"))
        return
    host, stream = _staging(min(rows, n), v, buffer.device)
    stream.wait_stream(torch.cuda.default_stream(buffer.device))  # the pass that filled `buffer`
    for chunk in buffer.split(rows):
        dst = host[: len(chunk)]
        with torch.cuda.stream(stream):
            dst.copy_(chunk, non_blocking=True)
        stream.synchronize()
        fh.write(memoryview(dst.numpy()).cast("B"))


def read_logits(path: Path, device: torch.device) -> torch.Tensor:
    """A .npy float32 (N, V) file straight into a device tensor, through one pinned chunk."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        if dtype != np.float32 or fortran or len(shape) != 2:
            raise ValueError(f"expected a C-ordered float32 matrix, found {dtype} {shape}")
        n, v = shape
        out = torch.empty((n, v), dtype=torch.float32, device=device)
        rows = max(1, _IO_CHUNK_BYTES // (4 * max(1, v)))
        host, _ = _staging(min(rows, max(n, 1)), v, device)
        for start in range(0, n, rows):
            dst = host[: min(rows, n - start)]
            if fh.readinto(memoryview(dst.numpy()).cast("B")) != dst.numel() * 4:
                raise ValueError("the file is shorter than its header says")
            out[start : start + len(dst)].copy_(dst)  # synchronous: `host` is reused next
        if fh.read(1):
            raise ValueError("the file is longer than its header says")
    return out
