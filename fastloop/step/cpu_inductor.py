"""Inductor options for a fused step compiled for the CPU.

Two costs dominate a small step on a CPU once the graph is called directly (see
``benchmarks/tiny_step_profile.py`` and ``benchmarks/RESULTS.md``):

* **OpenMP regions for tiny loops.** Inductor parallelises a loop once each thread gets 512
  iterations (``cpp.min_chunk_size``); ATen runs an elementwise loop serially up to its grain
  size of 32768 elements. On the tiny MLP that meant 5 ``#pragma omp parallel`` regions per step
  for loops of 64-2762 elements, each a fork/join of the OpenMP team: a few µs on a quiet
  machine, milliseconds on a busy one (a descheduled team thread stalls the region). The fused
  step uses ATen's rule instead: a loop runs in parallel only when it is longer than ATen's grain
  size, so it never opens a region the eager step would not.
* **The Python wrapper around the kernels.** Inductor's generated ``call`` spends a few µs of
  Python per kernel launch and buffer allocation. ``cpp_wrapper`` generates that function in C++;
  on the tiny MLP the graph went from ~170 to ~125 µs (CPU time, 1 thread). It also makes the
  cold compile cheaper: the kernels and the wrapper become one C++ translation unit, one g++ run
  instead of one per kernel, each re-reading inductor's headers (cold CPU seconds -23 % on the
  tiny MLP, -21 % on the small transformer, whose step time did not measurably change; see
  ``benchmarks/RESULTS.md``). That single file cannot be compiled in parallel, so very large
  models, with many kernels for many cores to build at once, keep the Python wrapper
  (``CPP_WRAPPER_MAX_PARAMETERS``: not measured on a many-core machine).

Options the user passes (``CompileConfig(inductor_config=...)``) win over these.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

__all__ = ["ATEN_GRAIN_SIZE", "CPP_WRAPPER_MAX_PARAMETERS", "cpu_step_options"]

# at::internal::GRAIN_SIZE: ATen's elementwise CPU kernels run serially up to this many elements.
ATEN_GRAIN_SIZE = 32768
# Models with at most this many parameter elements get inductor's C++ wrapper (all the bench's
# CPU models: small-transformer has 118656, lm-depth-8 418560).
CPP_WRAPPER_MAX_PARAMETERS = 1 << 20


def cpu_step_options(module: nn.Module, device: torch.device,
                     user_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The inductor options for ``module``'s fused step on ``device``, ``user_options`` included
    (they win). Nothing is added for other devices."""
    options: Dict[str, Any] = {}
    if device.type == "cpu":
        threads = max(torch.get_num_threads(), 1)
        # Inductor parallelises when iterations // threads >= min_chunk_size: with this value,
        # when the loop is longer than ATen's grain size, as ATen does.
        options["cpp.min_chunk_size"] = max(ATEN_GRAIN_SIZE // threads, 1)
        if sum(p.numel() for p in module.parameters()) <= CPP_WRAPPER_MAX_PARAMETERS:
            options["cpp_wrapper"] = True
    options.update(user_options or {})
    return options
