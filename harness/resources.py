"""Measuring a stage: wall time, peak host RSS, peak GPU memory (torch allocator and the device's own
NVML figure), and what a saved safetensors file holds.

    with resources.measure() as m:
        trainer.train()
    stats.update(m.result)   # seconds, peak_rss_bytes, peak_gpu_*_bytes, peak_nvml_used_bytes, ...

Peaks are the stage's own, not the process's: torch's peak stats are reset at the stage start; the
kernel's peak RSS (VmHWM) is reset through /proc/self/clear_refs where allowed, and a background
thread samples RSS and NVML every 200 ms (NVML sees the whole device: CUDA context, other processes,
paged optimizer states outside torch's allocator). Which source gave each figure is recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import threading
import time
from pathlib import Path

from harness import context

INTERVAL = 0.2  # seconds between samples (peaks from VmHWM and torch are exact; NVML is sampled)


def rss_bytes() -> int:
    """Resident set size now (Linux /proc; psutil elsewhere when installed; 0 when unknown)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        try:
            import psutil

            return psutil.Process().memory_info().rss
        except Exception:
            return 0


def _on_gpu() -> bool:
    """The run works on a GPU (its --device, through the context): a CPU run on a machine with a
    GPU records no GPU figures, which would be another process's or zero."""
    return context.current().device_kind() == "cuda"


def peak_rss_since_reset() -> int | None:
    """The kernel's peak RSS since the last reset (VmHWM)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Linux: reset VmHWM to the current RSS, so it then holds this stage's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _Nvml:
    """Device memory used, from the first source that works: pynvml (nvidia-ml-py), torch's wrapper
    of it, or nvidia-smi. The device is found by UUID so CUDA_VISIBLE_DEVICES is respected."""

    def __init__(self):
        import torch

        self.source, self._read = None, None
        # Jobs sharing the device (harness/parallel.py): its whole-device figure would count the others.
        if not _on_gpu() or os.environ.get("HARNESS_SHARED_DEVICE"):
            return
        idx = torch.cuda.current_device()
        uuid = str(getattr(torch.cuda.get_device_properties(idx), "uuid", "") or "")
        uuid = uuid if uuid.startswith("GPU-") or not uuid else f"GPU-{uuid}"
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = (pynvml.nvmlDeviceGetHandleByUUID(uuid.encode()) if uuid
                      else pynvml.nvmlDeviceGetHandleByIndex(idx))
            self._read = lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            self.source = "pynvml"
        except Exception:
            try:
                torch.cuda.device_memory_used(idx)  # needs pynvml or amdsmi underneath
                self._read = lambda: int(torch.cuda.device_memory_used(idx))
                self.source = "torch.cuda.device_memory_used"
            except Exception:
                smi = shutil.which("nvidia-smi")
                if smi and uuid:
                    cmd = [smi, f"--id={uuid}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
                    self._read = lambda: int(float(subprocess.run(cmd, capture_output=True, text=True,
                                                                  timeout=5).stdout.strip())) * 2**20  # MiB
                    self.source = "nvidia-smi"
        if self._read is not None:
            try:
                self._read()
            except Exception:
                self.source, self._read = None, None

    def read(self) -> int | None:
        try:
            return self._read() if self._read else None
        except Exception:
            return None


class measure:
    """Context manager; `.result` holds the stage's figures after exit (also on an exception)."""

    def __init__(self, interval: float = INTERVAL):
        self.interval, self.result = interval, {}

    def __enter__(self):
        import torch

        self._cuda = _on_gpu()
        if self._cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        # What the stage inherits (a model already loaded, or whatever an earlier stage left behind):
        # the part of its peak it did not allocate itself.
        self._held = torch.cuda.memory_allocated() if self._cuda else None
        self._nvml = _Nvml()
        self._hwm_reset = reset_peak_rss()
        self._rss, self._used = rss_bytes(), self._nvml.read() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="harness-resources", daemon=True)
        self._thread.start()
        self._start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._rss = max(self._rss, rss_bytes())
            used = self._nvml.read()
            if used is not None:
                self._used = max(self._used, used)

    def __exit__(self, *exc):
        import torch

        if self._cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - self._start
        self._stop.set()
        self._thread.join()
        self._sample_once()
        hwm = peak_rss_since_reset() if self._hwm_reset else None
        self.result = {
            "seconds": seconds,
            "peak_rss_bytes": max(self._rss, hwm or 0),
            "rss_source": "VmHWM reset at stage start, and sampled" if hwm else f"sampled every {self.interval}s",
            "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated() if self._cuda else None,
            "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved() if self._cuda else None,
            "start_gpu_allocated_bytes": self._held,
            "peak_nvml_used_bytes": self._used if self._nvml.source else None,
            "nvml_source": self._nvml.source,
        }
        return False

    def _sample_once(self) -> None:
        self._rss = max(self._rss, rss_bytes())
        used = self._nvml.read()
        if used is not None:
            self._used = max(self._used, used)


def footprint_bytes(model) -> int:
    """The loaded model's parameters and buffers in memory (4-bit weights as stored)."""
    return int(model.get_memory_footprint())


# ---------------------------------------------------------------- storage

SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def safetensors_summary(paths) -> dict:
    """Bytes on disk and elements per dtype, read from the files' own headers."""
    total, elements = 0, {}
    for path in paths:
        path = Path(path)
        total += path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(t["dtype"], t["dtype"].lower())
            count = 1
            for d in t["shape"]:
                count *= d
            elements[dtype] = elements.get(dtype, 0) + count
    return {"bytes": total, "elements_by_dtype": elements, "dtype": ",".join(sorted(elements))}


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA OOM, Python's MemoryError, or the CPU allocator's RuntimeError; other errors are bugs."""
    import torch

    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(s in msg for s in ("out of memory", "can't allocate", "cannot allocate"))
