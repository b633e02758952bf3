"""The copy bandwidths a placement plan predicts candidate times with: measured on this
machine (device-to-device and pinned host-to-device), or assumed where no CUDA device is
here to measure."""

from __future__ import annotations

import time

import torch

# Assumed bandwidths where none can be measured (bytes/s): HBM3 of an H100 at about
# 60% of its peak for elementwise kernels, and a PCIe Gen5 x16 host link with pinned
# buffers.
ASSUMED = {"cuda": {"device": 2.0e12, "link": 2.5e10}}


def measure_bandwidth(device: str) -> dict:
    """Copy bandwidth of this machine (bytes/s): device-to-device and host-to-device
    (pinned). Without a CUDA device for a cuda plan, the ASSUMED figures."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return {**ASSUMED["cuda"], "source": "assumed (no CUDA device here)"}
        n = 256 << 20
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        out = {}
        for label, fn in (("device", lambda: dst.copy_(src)), ("link", lambda: dst.copy_(host, non_blocking=True))):
            fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            moved = 5 * n * (2 if label == "device" else 1)  # a device copy reads and writes
            out[label] = moved / (time.perf_counter() - t0)
        return {**out, "source": "measured"}
    n = 64 << 20
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    bw = 5 * n * 2 / (time.perf_counter() - t0)
    return {"device": bw, "link": bw / 2, "source": "measured"}
