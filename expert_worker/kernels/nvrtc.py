"""Run-time compilation of this package's CUDA sources with NVRTC, cached, and their launch.

cuda-python (`cuda.bindings`) is imported lazily: importing this module never needs it, a GPU or a
driver. The first use of a kernel compiles it for the device's architecture (`sm_90a` on Hopper),
keeps the CUBIN in a disk cache keyed by a hash of the source, the headers beside it, the options,
the architecture and the NVRTC version (written atomically: temp file + rename), and loads it with
the driver API. An in-process cache sits in front of the disk cache. `MOE_KERNEL_CACHE_DIR` moves
the disk cache (default `~/.cache/moe-cluster/kernels`). The `*.cuh` files beside the sources are
handed to NVRTC as headers (`#include "common.cuh"`). `tensor_map_2d` makes the TMA descriptors
(`cuTensorMapEncodeTiled`) that the v3 kernel takes by value.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CACHE_ENV = "MOE_KERNEL_CACHE_DIR"
KERNEL_DIR = Path(__file__).resolve().parent

_lock = threading.Lock()
_loaded: dict[tuple[str, int], Kernel] = {}  # by (cache key, device index)
_by_request: dict[tuple[Any, ...], Kernel] = {}  # by (file, name, defines, device index)
_tensor_maps: dict[tuple[int, ...], Any] = {}  # by (address, rows, cols, box rows)
TENSOR_MAP_CACHE_SIZE = 256
_bindings: tuple[Any, Any] | None = None


def bindings() -> tuple[Any, Any]:
    """(driver, nvrtc) modules of cuda-python; a RuntimeError says what is missing."""
    global _bindings
    if _bindings is None:
        try:
            from cuda.bindings import driver, nvrtc
        except ImportError as e:
            raise RuntimeError(
                "the CUDA kernels need cuda-python (`pip install cuda-bindings`), "
                f"which could not be imported: {e}"
            ) from e
        _bindings = (driver, nvrtc)
    return _bindings


def check(result: Any) -> Any:
    """Check a cuda-python return value (CUresult or nvrtcResult first); return the rest.

    Every driver and NVRTC call in this package goes through here.
    """
    driver, nvrtc = bindings()
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if isinstance(err, driver.CUresult):
        if err != driver.CUresult.CUDA_SUCCESS:
            _, name = driver.cuGetErrorName(err)
            _, text = driver.cuGetErrorString(err)
            name = name.decode() if isinstance(name, bytes) else str(err)
            text = text.decode() if isinstance(text, bytes) else ""
            raise RuntimeError(f"CUDA driver error {name}: {text}")
    elif isinstance(err, nvrtc.nvrtcResult):
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, text = nvrtc.nvrtcGetErrorString(err)
            raise RuntimeError(f"NVRTC error: {text.decode() if isinstance(text, bytes) else err}")
    else:
        raise TypeError(f"not a CUresult or nvrtcResult: {err!r}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def cache_dir() -> Path:
    default = Path.home() / ".cache" / "moe-cluster" / "kernels"
    return Path(os.environ.get(CACHE_ENV, default)).expanduser()


def arch_of(device: torch.device) -> str:
    """NVRTC architecture for a CUDA device: `sm_90a` on Hopper (so wgmma is available)."""
    major, minor = torch.cuda.get_device_capability(device)
    suffix = "a" if major >= 9 else ""
    return f"sm_{major}{minor}{suffix}"


def nvrtc_version() -> tuple[int, int]:
    _, nvrtc = bindings()
    return tuple(check(nvrtc.nvrtcVersion()))


def _headers() -> dict[str, bytes]:
    """The `*.cuh` files beside the sources, by file name."""
    return {p.name: p.read_bytes() for p in sorted(KERNEL_DIR.glob("*.cuh"))}


def _headers_digest() -> str:
    h = hashlib.sha256()
    for name, text in _headers().items():
        h.update(name.encode() + b"\0" + text)
    return h.hexdigest()


def _compile(source: str, name: str, options: list[str]) -> tuple[bytes, str]:
    """NVRTC: CUDA C++ source -> (CUBIN, compiler log). The log is in the error on failure."""
    _, nvrtc = bindings()
    headers = _headers()
    prog = check(
        nvrtc.nvrtcCreateProgram(
            source.encode(),
            f"{name}.cu".encode(),
            len(headers),
            list(headers.values()),
            [h.encode() for h in headers],
        )
    )
    try:
        opts = [o.encode() for o in options]
        err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        size = check(nvrtc.nvrtcGetProgramLogSize(prog))
        log_buf = b" " * size
        check(nvrtc.nvrtcGetProgramLog(prog, log_buf))
        log = log_buf.decode(errors="replace").rstrip("\0 \n")
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(
                f"NVRTC failed to compile {name}.cu with {' '.join(options)}:\n{log}"
            )
        size = check(nvrtc.nvrtcGetCUBINSize(prog))
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin))
        return cubin, log
    finally:
        check(nvrtc.nvrtcDestroyProgram(prog))


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _ensure_context(device: torch.device) -> None:
    """Make the device's primary context (the one torch uses) current on this thread."""
    driver, _ = bindings()
    torch.cuda.init()
    check(driver.cuInit(0))
    dev = check(driver.cuDeviceGet(device.index))
    ctx = check(driver.cuDevicePrimaryCtxRetain(dev))
    current = check(driver.cuCtxGetCurrent())
    if current is None or int(current) != int(ctx):
        check(driver.cuCtxSetCurrent(ctx))


@dataclass
class Kernel:
    """A loaded kernel: `kernel(grid, block, smem_bytes, args)` launches it on torch's stream."""

    name: str
    function: Any
    device: torch.device
    registers: int
    local_bytes: int
    log: str
    max_smem: int = 0
    clusters: dict[tuple[int, int, int], int] = field(default_factory=dict)

    def _reserve_smem(self, smem_bytes: int) -> None:
        if smem_bytes > self.max_smem:
            driver, _ = bindings()
            check(
                driver.cuFuncSetAttribute(
                    self.function,
                    driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem_bytes,
                )
            )
            self.max_smem = smem_bytes

    def max_active_clusters(self, cluster: int, block: int, smem_bytes: int) -> int:
        """How many clusters of `cluster` CTAs (its compile-time __cluster_dims__) fit at once."""
        key = (cluster, block, smem_bytes)
        if key not in self.clusters:
            driver, _ = bindings()
            self._reserve_smem(smem_bytes)
            config = driver.CUlaunchConfig()
            config.gridDimX, config.gridDimY, config.gridDimZ = cluster, 1, 1
            config.blockDimX, config.blockDimY, config.blockDimZ = block, 1, 1
            config.sharedMemBytes = smem_bytes
            config.numAttrs = 0
            self.clusters[key] = int(
                check(driver.cuOccupancyMaxActiveClusters(self.function, config))
            )
        return self.clusters[key]

    def __call__(self, grid: int, block: int, smem_bytes: int, args: list[Any]) -> None:
        driver, _ = bindings()
        self._reserve_smem(smem_bytes)
        values, types = [], []
        for a in args:
            if isinstance(a, torch.Tensor):
                values.append(a.data_ptr())
                types.append(ctypes.c_void_p)
            elif a is None:
                values.append(0)
                types.append(ctypes.c_void_p)
            elif isinstance(a, ctypes._SimpleCData):
                values.append(a)
                types.append(type(a))
            elif callable(getattr(a, "getPtr", None)):  # a cuda-python struct (CUtensorMap)
                values.append(a)  # passed by value: cuda-python copies the struct it points at
                types.append(None)
            else:
                raise TypeError(
                    f"kernel arguments must be tensors, ctypes scalars or tensor maps, "
                    f"got {type(a).__name__}"
                )
        stream = driver.CUstream(torch.cuda.current_stream(self.device).cuda_stream)
        check(
            driver.cuLaunchKernel(
                self.function, grid, 1, 1, block, 1, 1, smem_bytes, stream,
                (tuple(values), tuple(types)), 0,
            )
        )  # fmt: skip


def load_kernel(
    source_file: str, name: str, defines: dict[str, int], device: torch.device
) -> Kernel:
    """Compile (or fetch from the caches) kernel `name` of `source_file` for `device`.

    `defines` become `-DKEY=VALUE` options. Raises RuntimeError without cuda-python, GPU or driver.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA kernels need an NVIDIA GPU and driver; torch sees none")
    index = torch.cuda.current_device() if device.index is None else device.index
    device = torch.device("cuda", index)
    request = (source_file, name, tuple(sorted(defines.items())), index)
    kernel = _by_request.get(request)
    if kernel is None:  # the fast path skips reading and hashing the source on every launch
        kernel = _load(source_file, name, defines, device)
        _by_request[request] = kernel
    return kernel


def _load(source_file: str, name: str, defines: dict[str, int], device: torch.device) -> Kernel:
    source = (KERNEL_DIR / source_file).read_text()
    arch = arch_of(device)
    options = [f"--gpu-architecture={arch}", "-std=c++17", "--ptxas-options=-v"]
    options += [f"-D{k}={v}" for k, v in sorted(defines.items())]
    major, minor = nvrtc_version()
    key = hashlib.sha256(
        "\0".join(
            [source, _headers_digest(), name, " ".join(options), arch, f"nvrtc {major}.{minor}"]
        ).encode()
    ).hexdigest()[:40]
    with _lock:
        cached = _loaded.get((key, device.index))
        if cached is not None:
            return cached
        path = cache_dir() / f"{Path(source_file).stem}-{name}-{arch}-{key}.cubin"
        log = ""
        if path.exists():
            cubin = path.read_bytes()
        else:
            cubin, log = _compile(source, name, options)
            _write_atomic(path, cubin)
        driver, _ = bindings()
        _ensure_context(device)
        module = check(driver.cuModuleLoadData(cubin))
        function = check(driver.cuModuleGetFunction(module, name.encode()))
        attr = driver.CUfunction_attribute
        regs = check(driver.cuFuncGetAttribute(attr.CU_FUNC_ATTRIBUTE_NUM_REGS, function))
        local = check(driver.cuFuncGetAttribute(attr.CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES, function))
        kernel = Kernel(name, function, device, int(regs), int(local), log)
        _loaded[(key, device.index)] = kernel
        return kernel


def tensor_map_2d(t: torch.Tensor, rows: int, cols: int, box_rows: int) -> Any:
    """TMA descriptor (CUtensorMap) of `t` seen as a contiguous [rows, cols] matrix of bytes.

    Boxes of box_rows x 128 bytes, 128-byte swizzle (the layout wgmma's descriptor reads), zeros
    for rows past `rows`. Cached by (address, rows, cols, box_rows): a descriptor holds no
    reference to the tensor and depends on nothing else, so a hit is always the same descriptor.
    """
    key = (t.data_ptr(), rows, cols, box_rows)
    tmap = _tensor_maps.get(key)
    if tmap is None:
        assert t.is_contiguous() and t.element_size() == 1 and t.numel() == rows * cols, (
            f"tensor map needs a contiguous 1-byte [{rows}, {cols}] tensor"
        )
        assert t.data_ptr() % 16 == 0 and cols % 128 == 0 and 0 < box_rows <= 256
        driver, _ = bindings()
        u64, u32 = driver.cuuint64_t, driver.cuuint32_t
        tmap = check(
            driver.cuTensorMapEncodeTiled(
                driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT8,
                2,
                t.data_ptr(),
                [u64(cols), u64(rows)],
                [u64(cols)],
                [u32(128), u32(box_rows)],
                [u32(1), u32(1)],
                driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
                driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
                driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        )
        with _lock:
            if len(_tensor_maps) >= TENSOR_MAP_CACHE_SIZE:
                _tensor_maps.clear()
            _tensor_maps[key] = tmap
    return tmap


@functools.cache
def sm_count(index: int) -> int:
    """Number of SMs of CUDA device `index` (the persistent kernel's grid bound)."""
    return torch.cuda.get_device_properties(index).multi_processor_count
