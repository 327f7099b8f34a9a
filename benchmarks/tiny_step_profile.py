"""Where one compiled tiny-MLP training step spends its time, layer by layer (CPU).

Run:  PYTHONPATH=. python benchmarks/tiny_step_profile.py [--blocks 21] [--steps 50] [--threads N]
          [--inductor KEY=VALUE ...] [--workload tiny-mlp]

One process, the bench's workload (default ``tiny-mlp``: MLP 32->64->10, batch 64, Adam) and its
contenders: the raw PyTorch loop and ``Trainer(mode="compiled")`` driven round by round in a
greenlet (``fastloop.bench.driven_fit``), so both run on one OS thread. Once the fit is warm,
blocks of ``--steps`` calls of each layer below are timed in turn, ``--blocks`` times, and the
median and minimum over blocks of the µs per call are printed:

    raw           the hand-written loop's step (zero_grad, forward, loss, backward, Adam.step)
    trainer       one step of the running fit (loops, hooks, counters, the fused step)
    fused         FusedStep.__call__ on the same batch (host side plus the graph)
    call_args     its host side before the graph: the optimizer's scalar table and state lists
    graph         the compiled graph as the direct call runs it (AOTAutograd's runtime wrapper
                  around inductor's ``call``)
    inductor      inductor's generated ``call`` alone: its Python wrapper and the kernels

and, from a separate pass with each kernel wrapped in a timer, the µs of every kernel (inductor's
C++ loops, ``cpp_fused_*``, and the ATen GEMMs it calls, ``extern.*``), with ``#pragma omp
parallel`` regions counted from the generated source. The differences give the layers' own
costs: loop host work = trainer - fused, the step's Python = fused - graph, AOTAutograd's wrapper
= graph - inductor, inductor's Python wrapper = inductor - sum of kernels.

``--inductor KEY=VALUE`` compiles with an inductor option (``CompileConfig.inductor_config``), to
compare variants in separate runs. The fused step's CPU defaults (``fastloop/step/cpu_inductor.py``)
apply otherwise; ``--inductor cpp.min_chunk_size=512 cpp_wrapper=False`` gives inductor's own.
``--clock cpu`` with ``--threads 1`` measures this thread's CPU time: the figure to use on a shared
machine, where lost time slices make wall-clock blocks useless.
"""
from __future__ import annotations

import argparse
import ast
import copy
import functools
import gc
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import torch

from fastloop.bench.contender import BatchCycle, RunSpec
from fastloop.bench.driven_fit import FitDriver
from fastloop.bench.fastloop_contender import BenchModule, _DriverCallback
from fastloop.bench.raw import RawLoop
from fastloop.bench.workloads import get_workload
from fastloop.config import CompileConfig
from fastloop.trainer import Trainer


def parse_options(pairs: List[str]) -> Dict[str, Any]:
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def start_fit(spec: RunSpec, inductor: Dict[str, Any], warmup: int) -> tuple:
    """A compiled fit, paused after ``warmup`` steps; returns (driver, trainer)."""
    module = BenchModule(copy.deepcopy(spec.model), spec.workload.loss_fn, spec.workload.make_optimizer)
    driver = FitDriver(spec.device)
    trainer = Trainer(max_epochs=1, max_steps=spec.total_steps, num_sanity_val_steps=0, logger=False,
                      enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                      mode="compiled", callbacks=[_DriverCallback(driver)],
                      compile_config=CompileConfig(inductor_config=inductor or None))
    driver.start(lambda: trainer.fit(module, train_dataloaders=BatchCycle(spec.batches, spec.total_steps)), warmup)
    return driver, trainer


def inductor_graph() -> Any:
    """Inductor's compiled training graph (a ``CompiledFxGraph``): of the graphs compiled in this
    process, the one that mutates the most inputs (parameters, optimizer state)."""
    from torch._inductor.output_code import CompiledFxGraph

    graphs = [obj for obj in gc.get_objects() if type(obj) is CompiledFxGraph]
    if not graphs:
        raise RuntimeError("no inductor graph found in this process")
    return max(graphs, key=lambda g: len(getattr(g, "mutated_input_idxs", ()) or ()))


def repeat(fn: Callable[[], Any], grad: bool = True) -> Callable[[int], None]:
    """``n -> None`` calling ``fn`` n times (under no_grad unless ``grad``)."""
    def block(n: int) -> None:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            for _ in range(n):
                fn()
    return block


def time_blocks(variants: Dict[str, Callable[[int], Any]], blocks: int, steps: int,
                clock: Callable[[], float]) -> Dict[str, List[float]]:
    """µs per step of each variant, ``blocks`` interleaved blocks of ``steps`` steps."""
    runs: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(blocks):
        for name, block in variants.items():
            start = clock()
            block(steps)
            runs[name].append((clock() - start) / steps * 1e6)
    return runs


def kernel_times(module: Any, inputs: List[torch.Tensor], calls: int,
                 clock_ns: Callable[[], int]) -> tuple[Dict[str, float], float]:
    """µs per ``call`` spent in each kernel (timers wrapped around each), and the wrapped total."""
    spent: Dict[str, int] = {}

    def timed(name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = clock_ns()
            out = fn(*args, **kwargs)
            spent[name] = spent.get(name, 0) + clock_ns() - start
            return out
        return wrapper

    class Extern:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            return timed(f"extern.{name}", getattr(self.inner, name))

    saved = dict(vars(module))
    try:
        for name, fn in saved.items():
            if name.startswith("cpp_fused"):
                setattr(module, name, timed(name if len(name) < 60 else name[:40] + "..." + name[-6:], fn))
        if "extern_kernels" in saved:
            module.extern_kernels = Extern(saved["extern_kernels"])
        for _ in range(max(calls // 10, 10)):
            module.call(list(inputs))
        spent.clear()
        start = clock_ns()
        for _ in range(calls):
            module.call(list(inputs))
        total = (clock_ns() - start) / calls / 1e3
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
    return {name: ns / calls / 1e3 for name, ns in spent.items()}, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="tiny-mlp")
    parser.add_argument("--blocks", type=int, default=21)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this thread's CPU time (time.thread_time), which time slices lost to "
                             "other processes do not inflate; meaningful with --threads 1 only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    options = parse_options(args.inductor)
    workload = get_workload(args.workload)
    device = torch.device("cpu")
    total = 20 + args.blocks * args.steps + 10
    spec = RunSpec(workload, device, workload.model(0), workload.batches(64, 0, device), total)
    raw = RawLoop()
    raw.setup(spec)
    raw.warmup(20)
    driver, trainer = start_fit(spec, options, 20)
    step = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.train_step
    fused = step.fused[0]
    (slot, direct), = fused._direct.items()
    x, y = spec.batches[0]
    batch = ((x, y),)
    call_args = fused.call_args(batch, True)
    train, frozen, buffers, grads, opt_inputs, scaler_state, nonfinite_state, flag, _ = call_args
    names = dict(fused._free_vars.get(slot[0], ()), train=train, frozen=frozen, buffers=buffers, grads=grads,
                 opt_inputs=opt_inputs, new_window=flag, scaler_state=scaler_state,
                 nonfinite_state=nonfinite_state, batch=batch)
    inputs = direct._gather(names)
    graph = direct._fn
    compiled = inductor_graph()
    run_inductor = compiled.current_callable
    # The Python wrapper's module (absent under cpp_wrapper, whose kernels are not timed one by one).
    module = sys.modules.get(getattr(run_inductor, "__module__", ""))
    if module is None or not any(k.startswith("cpp_fused") for k in vars(module)):
        module = None
    source = compiled.source_code or ""

    variants = {
        "raw": raw._steps,
        "trainer": driver.resume,  # the fit's next n steps; one greenlet switch per block
        "fused": repeat(lambda: fused(*batch)),
        "call_args": repeat(lambda: (fused.call_args(batch, True), fused.after_call(True))),
        "graph": repeat(lambda: graph(*inputs), grad=False),  # as FusedStep.run calls it
        "inductor": repeat(lambda: run_inductor(list(inputs)), grad=False),
    }
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    runs = time_blocks(variants, args.blocks, args.steps, clock)
    med = {k: statistics.median(v) for k, v in runs.items()}
    low = {k: min(v) for k, v in runs.items()}
    clock_ns = time.thread_time_ns if args.clock == "cpu" else time.perf_counter_ns
    kernels, wrapped_total = {}, float("nan")
    if module is not None:
        with torch.no_grad():
            kernels, wrapped_total = kernel_times(module, inputs, args.blocks * args.steps, clock_ns)
    driver.abort()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, workload {workload.name}, "
          f"inductor options {options or 'none'}; {args.blocks} blocks x {args.steps} calls, {args.clock} clock")
    print(f"{'layer':12s} {'median µs':>10s} {'min µs':>8s}")
    for k in variants:
        print(f"{k:12s} {med[k]:10.1f} {low[k]:8.1f}")
    print(f"speedup trainer vs raw (median of blocks): {med['raw'] / med['trainer']:.2f}x "
          f"(min {low['raw'] / low['trainer']:.2f}x)")
    print("own cost of each layer (medians):")
    kernel_sum = sum(kernels.values()) if kernels else float("nan")
    parts = [
        ("loop host work (trainer - fused)", med["trainer"] - med["fused"]),
        ("step Python (fused - graph)", med["fused"] - med["graph"]),
        ("  of which call_args/after_call", med["call_args"]),
        ("AOTAutograd wrapper (graph - inductor)", med["graph"] - med["inductor"]),
        ("inductor Python wrapper (inductor - kernels)", med["inductor"] - kernel_sum),
        ("kernels", kernel_sum),
    ]
    for label, value in parts:
        print(f"  {label:46s} {value:8.1f}")
    regions = source.count("#pragma omp parallel")
    n_kernels = source.count('extern "C"')
    print(f"kernels (µs per step, wrapped pass: call {wrapped_total:.1f}); "
          f"{n_kernels} C++ kernels, "
          f"{regions} '#pragma omp parallel' regions:")
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1]):
        print(f"  {name:60s} {us:8.1f}")


if __name__ == "__main__":
    main()
