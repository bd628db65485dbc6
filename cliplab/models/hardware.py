"""What the CPU can do fast. The bf16 fast mode pays off only where the CPU multiplies bf16 natively (AVX512-BF16 or
AMX on x86, the BF16 extension on Arm): measured on an AMD EPYC with AVX2 only, bf16 matmuls ran at 18 GFLOP/s
against 160 in fp32 (8x slower), while a CPU with AMX ran them 2.2x faster than fp32 (docs/fast_path.md)."""

from __future__ import annotations

import functools
import platform
import warnings
from pathlib import Path

_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 / AMX; Arm's "bf16" feature


class PerformanceWarning(UserWarning):
    """A setting will run slower than the default on this machine."""


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool | None:
    """True when the CPU multiplies bf16 natively, False when it does not, None when this cannot be read
    (no ``/proc/cpuinfo``, e.g. macOS)."""
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
    return bool(flags & _BF16_FLAGS)


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
