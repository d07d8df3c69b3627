"""Host memory shared with the forwarder processes, pinned for the GPU.

The arena is a list of segments, each an anonymous shared-memory file (`memfd_create`, so the
size of a container's /dev/shm does not bound it) mapped into the router and, by file descriptor,
into every forwarder process. When the router runs on a GPU each segment is registered with CUDA
(page-locked), so a layer's tokens go from the device into it, and the workers' results from it
to the device, by DMA without another copy.

Blocks are carved from a segment by a bump pointer; a segment's pointer goes back to its start
when its last block is released. A block has holders (the layer that staged it, the calls that
read or write it) and returns to the arena when the last one releases it, and only once the
device has finished the copies recorded on it (a CUDA event). A layer's blocks are in use from its
dispatch to the end of its combine, so the arena stays about as large as two layers' traffic.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch loads only where tensors are asked for (front processes go without)
    import torch

_ALIGN = 256
_MIN_SEGMENT_BYTES = 64 << 20


class HostArenaError(RuntimeError):
    """Shared host memory could not be made or registered."""


@dataclass(eq=False)
class Segment:
    index: int
    fd: int  # the memfd, sent to forwarder processes
    size: int
    map: mmap.mmap
    array: np.ndarray  # [size] uint8 over the map
    registered: bool = False  # page-locked with CUDA
    top: int = 0  # bump pointer
    live: int = 0  # blocks not yet returned


@dataclass(eq=False)
class Block:
    segment: Segment
    offset: int
    nbytes: int
    holders: int
    events: list = field(default_factory=list)  # CUDA events to wait for before reuse

    def view(self, start: int = 0, nbytes: int | None = None) -> np.ndarray:
        """[nbytes] uint8 view of the block from start (no copy)."""
        end = self.nbytes if nbytes is None else start + nbytes
        if not 0 <= start <= end <= self.nbytes:
            raise HostArenaError(f"bytes {start}-{end} are outside a block of {self.nbytes}")
        return self.segment.array[self.offset + start : self.offset + end]

    def tensor(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[nbytes / itemsize] view of the block (no copy), uint8 by default."""
        import torch

        raw = torch.from_numpy(self.view())
        return raw if dtype is None else raw.view(dtype)


class HostArena:
    """Thread-safe: the model's thread allocates, forwarder reader threads release."""

    def __init__(self, pin: bool, on_new_segment=None) -> None:
        self.pin = pin  # register segments with CUDA
        self.on_new_segment = on_new_segment  # called with each new Segment (to share its fd)
        self.segments: list[Segment] = []
        self._lock = threading.Lock()
        self._returned: list[Block] = []  # released, waiting for their events
        self.closed = False

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.segments)

    def alloc(self, nbytes: int, holders: int = 1) -> Block:
        """A block of at least nbytes with that many holders."""
        nbytes = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
        with self._lock:
            if self.closed:
                raise HostArenaError("the host arena is closed")
            self._reclaim()
            for segment in self.segments:
                if segment.live == 0:
                    segment.top = 0
                if segment.top + nbytes <= segment.size:
                    return self._carve(segment, nbytes, holders)
            segment = self._new_segment(max(_MIN_SEGMENT_BYTES, 2 * nbytes))
        if self.on_new_segment is not None:
            self.on_new_segment(segment)
        with self._lock:
            if segment.top + nbytes > segment.size:  # (cannot happen: it is new and large)
                raise HostArenaError(f"a new segment has no room for {nbytes} bytes")
            return self._carve(segment, nbytes, holders)

    def hold(self, block: Block) -> None:
        """One more holder of the block."""
        with self._lock:
            if block.holders < 1:
                raise HostArenaError("a block was held after it was returned")
            block.holders += 1

    def release(self, block: Block, event=None) -> None:
        """One holder is done with the block; event: device work that still reads or writes it."""
        with self._lock:
            if event is not None:
                block.events.append(event)
            block.holders -= 1
            if block.holders < 0:
                raise HostArenaError("a block was released more often than it was held")
            if block.holders == 0:
                self._returned.append(block)
                self._reclaim()

    def locate(self, t: torch.Tensor) -> tuple[int, int]:
        """A tensor inside the arena -> (segment index, byte offset)."""
        address = t.data_ptr()
        for segment in self.segments:
            base = segment.array.ctypes.data
            if base <= address < base + segment.size:
                if address + t.numel() * t.element_size() > base + segment.size:
                    break
                return segment.index, address - base
        raise HostArenaError("the tensor is not in the host arena")

    def close(self) -> None:
        with self._lock:
            self.closed = True
            segments, self.segments = self.segments, []
        for segment in segments:
            if segment.registered:
                unregister_host(segment.array)
            os.close(segment.fd)
            # the map itself goes with its last view (tensors may still point into it)

    def _carve(self, segment: Segment, nbytes: int, holders: int) -> Block:
        block = Block(segment, segment.top, nbytes, holders)
        segment.top += nbytes
        segment.live += 1
        return block

    def _reclaim(self) -> None:
        """Returns released blocks whose device work has finished; the lock is held."""
        waiting = []
        for block in self._returned:
            if all(event.query() for event in block.events):
                block.segment.live -= 1
            else:
                waiting.append(block)
        self._returned = waiting

    def _new_segment(self, size: int) -> Segment:
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        fd = os.memfd_create(f"moe-router-arena-{len(self.segments)}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mapped = mmap.mmap(fd, size)
        except OSError as err:
            os.close(fd)
            raise HostArenaError(f"cannot map {size} bytes of shared memory: {err}") from err
        segment = Segment(len(self.segments), fd, size, mapped, np.frombuffer(mapped, np.uint8))
        if self.pin:
            try:
                register_host(segment.array)
            except HostArenaError:
                os.close(fd)
                raise
            segment.registered = True
        self.segments.append(segment)
        return segment


def register_host(array: np.ndarray) -> None:
    """Page-locks host memory for the GPU (cudaHostRegister): copies from and to it are DMA."""
    import torch

    code = torch.cuda.cudart().cudaHostRegister(array.ctypes.data, array.nbytes, 0)
    if int(code) != 0:
        raise HostArenaError(f"cudaHostRegister of {array.nbytes} bytes failed with code {code}")


def unregister_host(array: np.ndarray) -> None:
    import torch

    torch.cuda.cudart().cudaHostUnregister(array.ctypes.data)
