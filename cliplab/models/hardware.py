"""What the CPU can do fast. The bf16 fast mode pays off only where the CPU multiplies bf16 natively (AVX512-BF16 or
AMX on x86, the BF16 extension on Arm): measured on an AMD EPYC with AVX2 only, bf16 matmuls ran at 18 GFLOP/s
against 160 in fp32 (8x slower), while a CPU with AMX ran them 2.2x faster than fp32 (docs/fast_path.md)."""

from __future__ import annotations

import functools
import platform
import warnings
from pathlib import Path

_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 / AMX; Arm's "bf16" feature
_AMX_FLAGS = {"amx_bf16"}
LARGE_L2 = 2 * 1024 * 1024  # bytes per core from which larger inference slices pay (see slice_tokens)


class PerformanceWarning(UserWarning):
    """A setting will run slower than the default on this machine."""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo``; None where they cannot be read (e.g. macOS)."""
    info = Path("/proc/cpuinfo")
    if platform.system() != "Linux" or not info.exists():
        return None
    try:
        text = info.read_text(errors="replace")
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.lower().startswith(("flags", "features")):
            flags.update(line.split(":", 1)[-1].split())
    return frozenset(flags)


def native_bf16() -> bool | None:
    """True when the CPU multiplies bf16 natively, False when it does not, None when this cannot be read
    (no ``/proc/cpuinfo``, e.g. macOS)."""
    flags = cpu_flags()
    return None if flags is None else bool(flags & _BF16_FLAGS)


def has_amx() -> bool:
    """True on x86 CPUs with AMX-BF16 tile instructions (Intel Sapphire Rapids and later)."""
    return bool(cpu_flags() and cpu_flags() & _AMX_FLAGS)


@functools.lru_cache(maxsize=1)
def l2_cache_bytes() -> int | None:
    """The first core's L2 cache size (Linux sysfs); None where it cannot be read."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(root.glob("index*")):
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1024, "M": 1024**2}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        return None
    return None


def slice_tokens() -> int:
    """Tokens per inference slice of the CLIP towers (``cliplab.models.towers.SLICE_TOKENS``): a slice's
    activations should stay in the L2 cache. Measured on 2 cores, ViT-B/32, side by side on a quiet machine: an AMD
    EPYC (512 KiB-1 MiB L2 per core) ran 512-token slices at 133 vs 94 texts/s against whole batches of 256; an Intel
    Xeon with 2 MiB L2 per core ran 2048-token slices 1.33x (bf16 text), 1.29x (bf16 images), 1.07x (fp32 text) and
    1.09x (fp32 images) faster than 512-token ones (docs/fast_path.md)."""
    l2 = l2_cache_bytes()
    return 2048 if l2 is not None and l2 >= LARGE_L2 else 512


def short_attention_limit() -> int:
    """Longest sequence for which low-precision attention runs as two matmuls and a softmax rather than PyTorch's
    fused CPU kernel (``cliplab.models.transformer.SHORT_SEQUENCE``). The plain path was 1.9x faster at 50 tokens on
    an AMD EPYC with AVX512-BF16; with AMX the fused kernel wins from about 50 tokens (5.2 vs 8.0 ms at 50, 5.5 vs 7.6
    at 64; ViT-B/32 bf16 images 1.10x faster with it) and ties at 20."""
    return 32 if has_amx() else 96


_warned = False


def warn_if_slow_bf16(stacklevel: int = 3) -> None:
    """Once per process: say that bf16 will be slower than fp32 on a CPU without native bf16 (the numbers still
    hold; only the speed is lost)."""
    global _warned
    if _warned or native_bf16() is not False:
        return
    _warned = True
    warnings.warn("this CPU has no native bf16 (no AVX512-BF16, AMX or Arm BF16): the bf16 fast mode runs slower "
                  "than fp32 here (measured 8x slower matmuls on an AVX2-only CPU); use precision='fp32'",
                  PerformanceWarning, stacklevel=stacklevel)
