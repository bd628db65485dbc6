"""Opt-in ``torch.compile`` of a tower's plain forward (:meth:`cliplab.CLIP.set_compiled`).

Inductor turns the eager graph into generated C++ kernels that fuse what eager PyTorch runs as separate passes over
memory (bias + activation, residual adds, LayerNorms, the head split and merge) and, with ``freeze``, pre-packs the
weights into oneDNN's blocked layout. Measured on ViT-B/32 fp32 (2 AVX-512 cores, quiet machine, before freezing
worked): images 1.40x eager at batch 64 and 2.2x at batch 1, texts 1.26x, cosine to eager 1.000000; in bf16 on 2 AMX
cores, with freezing: images 155 per s against OpenVINO bf16's 145 and eager's 132, texts 943 against 781 and 701.
Compiling costs 20-100 s per tower on the first call (inductor's on-disk cache shortens a later process's). Figures
and what did not help: docs/fast_path.md.

Only the plain path is compiled, and only without gradients: the token-level API (``output=``, hooks, ``keep``,
``inputs_embeds``) and training run eagerly, unchanged. ``freeze`` folds the weights into the compiled code as
constants, so a compiled tower would silently keep old weights after an in-place update (an optimiser step,
``load_state_dict``); each call compares the weights' storage and version counters with those it was compiled
against and recompiles, with a warning, when they differ.
"""

from __future__ import annotations

import itertools
import time
import types
import warnings

import torch
from torch import nn


#: torch.compile's modes (on a CPU, ``max-autotune`` lets inductor time its own C++/AMX GEMM template against oneDNN
#: for each matmul shape: ViT-B/32 bf16 images 3-5% faster than the default mode, compiling 10-30 s longer)
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")


def own_code(module: nn.Module, method: str):
    """``module.method`` bound to a private copy of its function's code object.

    Dynamo caches compiled code on the code object, shared by every instance of the class, and (torch 2.13) its
    guards do not tell two models of one class apart once their weights are frozen: a second compiled model reused
    the first one's code and returned the first model's features (found in testing, 5.0 max abs error on
    test-tiny). A code object of its own gives each compiled tower its own cache."""
    func = getattr(type(module), method)
    code = func.__code__.replace()  # an equal but distinct code object
    own = types.FunctionType(code, func.__globals__, func.__name__, func.__defaults__, func.__closure__)
    own.__kwdefaults__, own.__qualname__ = func.__kwdefaults__, func.__qualname__
    return types.MethodType(own, module)


def compile_mode(compile: bool | str) -> str | None:
    """``compile`` as :func:`cliplab.load` and ``embed`` take it (``True``, ``False`` or a mode name) -> the mode for
    :meth:`cliplab.CLIP.set_compiled` (``None``: the default); a one-line ValueError for anything else."""
    if isinstance(compile, bool):
        return None
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be True, False or one of {list(COMPILE_MODES)}, got {compile!r}")
    return None if compile == "default" else compile


def weights_stamp(module: nn.Module) -> tuple:
    """Where each parameter and buffer lives and how often it was written in place: changes whenever the weights do
    (an optimiser step, ``load_state_dict``, ``.to(dtype)``), costs microseconds."""
    stamp = []
    for t in itertools.chain(module.parameters(), module.buffers()):
        try:
            version = t._version
        except RuntimeError:  # an inference tensor has no version counter; it cannot be updated in place either
            version = -1
        stamp.append((t.data_ptr(), t.dtype, version))
    return tuple(stamp)


class InductorTower:
    """``module``'s ``method`` (its forward by default) through ``torch.compile`` (inductor), recompiled when the
    weights change under it.

    ``warmup_s``: the seconds the first call took (compilation included), ``None`` until then; ``recompiles``: how
    often changed weights forced a new compilation."""

    def __init__(self, module: nn.Module, method: str = "forward", *, freeze: bool = True, mode: str | None = None):
        compile_mode(mode or "default")  # a mode torch does not know fails here, not on the first call
        self.module, self.method, self.freeze, self.mode = module, method, freeze, mode
        self.warmup_s: float | None = None
        self.recompiles = 0
        self._compile()

    def _compile(self) -> None:
        # torch.compile takes a mode or options, not both: a mode becomes the inductor options it stands for
        options = {**torch._inductor.list_mode_options(self.mode or "default"), "freezing": self.freeze}
        self.fn = torch.compile(own_code(self.module, self.method), options=options)
        self.stamp = weights_stamp(self.module)
        self.warmup_s = None

    def __call__(self, *args):
        stamp = weights_stamp(self.module)
        if stamp != self.stamp:
            warnings.warn(f"{type(self.module).__name__}: the weights changed since it was compiled; recompiling "
                          "(set_compiled(False) while training)", RuntimeWarning, stacklevel=3)
            self.recompiles += 1  # into a fresh code object (own_code): the old weights' code is never found again
            self._compile()
        # Dynamo passes a module's parameters to inductor as graph inputs unless told to prepare for freezing; without
        # this, ``freezing`` silently folds nothing (torch 2.13) and the matmuls stay unpacked ``addmm`` calls
        # (ViT-B/32 bf16 on AMX: 126 images/s, against 143 with the packed oneDNN weights). Patched on every call,
        # since a new input shape (a text batch of another length) compiles again.
        with torch._dynamo.config.patch(prepare_freezing=self.freeze):
            if self.warmup_s is not None:
                return self.fn(*args)
            start = time.perf_counter()
            out = self.fn(*args)
        self.warmup_s = time.perf_counter() - start
        return out
