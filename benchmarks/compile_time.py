"""Compile time of the fused step: cold and warm first step per workload, graphs, cache hits.

Run:  PYTHONPATH=. python benchmarks/compile_time.py [--workloads tiny-mlp,small-transformer,gan]
          [--variant NAME] [--phases cold,warm,shipped] [--last-batch] [--json out.json]

Each measurement is a fresh Python process (nothing of Dynamo's in-memory caches survives) that
fits a few steps in ``mode="compiled"``. Per workload, back to back: "cold" with an empty
``TORCHINDUCTOR_CACHE_DIR`` (a new temporary directory), then "warm" with the same directory,
as a second run of the same script on the same machine would find it. Reported per run:

- first step: wall seconds of the first training step (everything the step compiles);
- compile: ``trainer.explain()``'s compile seconds (the calls that compiled a graph);
- CPU: user+system seconds of the child process and of its compile workers while fitting
  (the machine is shared: CPU seconds move less with other people's load than wall seconds);
- dynamo: seconds in Dynamo itself (bytecode tracing, guards; never cached), the rest of the
  compile being AOTAutograd + inductor (cached in the FX-graph and AOTAutograd caches);
- hits/misses of the FX-graph cache and of the AOTAutograd cache.

"shipped": a third process with another empty cache directory that first loads the portable
cache artifacts the cold run saved (``fastloop.step.compile_cache``): a fresh machine given the
file; its first step includes the load.

``--last-batch`` appends a smaller batch (half a batch) at the end of the epoch and reports
the seconds of that step (the extra graph a smaller last batch costs).

Workloads: the bench's training workloads (``python -m fastloop.bench --list``), ``gan`` (the
two-optimizer GAN of ``examples/lightning_port``, noise drawn in the step) and ``lm-depth-N``
(the small-transformer LM with N layers). ``--variant`` applies a named set of inductor
options (``VARIANTS``) or environment variables to the children, to measure one lever.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WORKLOADS = "tiny-mlp,mnist-mlp,small-cnn,small-transformer,gan"

# name -> (inductor options for CompileConfig(inductor_config=...), extra environment)
VARIANTS: Dict[str, Tuple[Dict[str, Any], Dict[str, str]]] = {
    "default": ({}, {}),
    "threads1": ({}, {"TORCHINDUCTOR_COMPILE_THREADS": "1"}),
    "cpp-wrapper": ({"cpp_wrapper": True}, {}),
    "no-pattern-matcher": ({"pattern_matcher": False}, {}),
    "no-caches": ({"fx_graph_cache": False}, {"TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}),
    "cpp-wrapper-threads1": ({"cpp_wrapper": True}, {"TORCHINDUCTOR_COMPILE_THREADS": "1"}),
    "no-cpp-wrapper": ({"cpp_wrapper": False}, {}),
    # Fewer, larger kernels: fewer C++ functions to generate and compile.
    "aggressive-fusion": ({"aggressive_fusion": True}, {}),
}
PHASES = ("cold", "warm", "shipped")


# --------------------------------------------------------------------------- child side
def _workload_fit(name: str, steps: int, last_batch: bool) -> Tuple[Any, Any, Any]:
    """(module, train loader, number of batches) for ``name``."""
    import torch

    if name == "gan":
        sys.path.insert(0, ROOT)
        from examples.lightning_port.generative_adversarial_net import GAN, RandomImages

        torch.manual_seed(0)
        dm = RandomImages(batch_size=16, length=16 * steps + (8 if last_batch else 0))
        return GAN(), dm.train_dataloader(), None
    from fastloop.bench import models
    from fastloop.bench.fastloop_contender import BenchModule
    from fastloop.bench.workloads import get_workload

    if name.startswith("lm-depth-"):
        workload = get_workload("small-transformer")
        torch.manual_seed(0)
        net = models.TinyTransformerLM(layers=int(name.rsplit("-", 1)[1]))
    else:
        workload = get_workload(name)
        net = workload.model(0)
    batches = workload.batches(steps, 0, torch.device("cpu"))
    if last_batch:
        batches.append(tuple(t[: max(1, t.shape[0] // 2)] for t in batches[-1]))
    return BenchModule(net, workload.loss_fn, workload.make_optimizer), batches, None


def child(name: str, steps: int, last_batch: bool, inductor: Dict[str, Any], save: Optional[str] = None,
          load: Optional[str] = None) -> Dict[str, Any]:
    """Fit ``steps`` (+1) batches compiled; return the figures of this run. ``load``/``save``: a
    portable compile-cache file to load before the fit / to write after it."""
    import torch
    from torch._dynamo.utils import compilation_time_metrics, counters

    from fastloop import Trainer
    from fastloop.callback import Callback
    from fastloop.config import CompileConfig
    from fastloop.step.compile_cache import load_compile_cache, save_compile_cache

    class StepClock(Callback):
        def __init__(self) -> None:
            self.seconds: List[float] = []
            self._start = 0.0

        def on_train_batch_start(self, *args: Any) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    module, loader, _ = _workload_fit(name, steps, last_batch)
    clock = StepClock()
    trainer = Trainer(max_epochs=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False, mode="compiled",
                      callbacks=[clock], compile_config=CompileConfig(inductor_config=inductor or None))
    cpu_before = time.process_time()
    load_s = 0.0
    if load:
        start = time.perf_counter()
        load_compile_cache(load)
        load_s = time.perf_counter() - start
    trainer.fit(module, train_dataloaders=loader)
    if save:
        save_compile_cache(save)
    step = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report
    metrics = {k: sum(v) for k, v in compilation_time_metrics.items()}
    dynamo = metrics.get("_compile.compile_inner", 0.0) - metrics.get("OutputGraph.call_user_compiler", 0.0)
    # A GAN batch runs one step per optimizer: the first batch holds both first compiles.
    return {
        "workload": name, "mode_used": step.used, "fallbacks": step.reasons,
        "first_step_s": clock.seconds[0] + load_s, "load_s": load_s, "last_step_s": clock.seconds[-1] if last_batch else None,
        "steady_step_s": sorted(clock.seconds[1:-1] or clock.seconds)[len(clock.seconds[1:-1] or clock.seconds) // 2],
        "compile_s": float(getattr(step.step, "compile_seconds", 0.0) or 0.0),
        "graphs": int(getattr(step.step, "graph_count", 0) or 0),
        "dynamo_s": dynamo,
        "cpu_before_fit_s": cpu_before,
        "fx_hit": counters["inductor"]["fxgraph_cache_hit"], "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
        "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
        "aot_miss": counters["aot_autograd"]["autograd_cache_miss"],
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------- parent side
def measure(name: str, cache_dir: str, steps: int, last_batch: bool, variant: str, timeout: float,
            artifacts: Tuple[str, str] = ("", "")) -> Dict[str, Any]:
    """One child process; adds its wall and CPU seconds (with its compile workers)."""
    inductor, extra_env = VARIANTS[variant]
    env = {**os.environ, **extra_env, "TORCHINDUCTOR_CACHE_DIR": cache_dir,
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    env.pop("FASTLOOP_MODE", None)  # the test suite pins eager; this measures compiled mode
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--steps", str(steps),
           "--inductor", json.dumps(inductor), "--save", artifacts[0], "--load", artifacts[1]]
    cmd += ["--last-batch"] if last_batch else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name}: child failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(lines[-1])
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out["process_wall_s"] = wall
    out["fit_cpu_s"] = cpu - out["cpu_before_fit_s"]  # the child's import and set-up excluded
    return out


def run(workloads: List[str], steps: int, last_batch: bool, variant: str, timeout: float,
        log=lambda s: print(s, file=sys.stderr, flush=True), phases: Tuple[str, ...] = PHASES) -> List[Dict[str, Any]]:
    """Per workload the ``phases`` asked for (cold always runs: warm and shipped reuse its cache
    directory and its artifacts); a phase not run is None in the row."""
    rows = []
    for name in workloads:
        row: Dict[str, Any] = {"workload": name, "variant": variant, "warm": None, "shipped": None}
        with tempfile.TemporaryDirectory(prefix="fastloop-compile-time-") as cache, \
                tempfile.TemporaryDirectory(prefix="fastloop-compile-time-") as fresh:
            shipped_file = os.path.join(fresh, "artifacts.bin") if "shipped" in phases else ""
            row["cold"] = measure(name, cache, steps, last_batch, variant, timeout, (shipped_file, ""))
            log(f"[{name}] cold: first step {row['cold']['first_step_s']:.1f}s, CPU {row['cold']['fit_cpu_s']:.1f}s")
            if "warm" in phases:
                row["warm"] = measure(name, cache, steps, last_batch, variant, timeout)
                log(f"[{name}] warm: first step {row['warm']['first_step_s']:.1f}s")
            if "shipped" in phases:
                row["shipped"] = measure(name, os.path.join(fresh, "cache"), steps, last_batch, variant, timeout,
                                         ("", shipped_file))
                log(f"[{name}] shipped: first step {row['shipped']['first_step_s']:.1f}s")
        rows.append(row)
    return rows


def _fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: List[Dict[str, Any]], last_batch: bool) -> str:
    head = ["workload", "variant", "mode", "graphs", "cold s", "warm s", "warm/cold", "cold CPU s", "warm CPU s",
            "warm dynamo s", "warm cache hits (fx, aot)", "shipped s"] + (["last batch cold s", "last batch warm s"] if last_batch else [])
    lines = [head]
    for r in rows:
        c, w, shipped = r["cold"], r["warm"] or {}, r["shipped"] or {}
        ratio = w["first_step_s"] / c["first_step_s"] if w else None
        hits = f"{w['fx_hit']}/{w['fx_hit'] + w['fx_miss']}, {w['aot_hit']}/{w['aot_hit'] + w['aot_miss']}" if w else "-"
        lines.append([
            r["workload"], r["variant"], c["mode_used"], str(c["graphs"]), _fmt(c["first_step_s"]),
            _fmt(w.get("first_step_s")), _fmt(ratio, ".2f"), _fmt(c["fit_cpu_s"]),
            _fmt(w.get("fit_cpu_s")), _fmt(w.get("dynamo_s")), hits, _fmt(shipped.get("first_step_s")),
        ] + ([_fmt(c["last_step_s"]), _fmt(w.get("last_step_s"))] if last_batch else []))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(line, widths)) + " |" for line in lines]
    text.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(text)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS, help=f"comma-separated (default {DEFAULT_WORKLOADS})")
    p.add_argument("--steps", type=int, default=3, help="full batches per fit (the first one compiles)")
    p.add_argument("--last-batch", action="store_true", help="add a half-size last batch (one more graph)")
    p.add_argument("--variant", default="default", choices=sorted(VARIANTS), help="a compile-time lever to apply")
    p.add_argument("--phases", default=",".join(PHASES),
                   help="comma-separated subset of cold,warm,shipped (cold always runs)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per child process")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--child", metavar="WORKLOAD", help=argparse.SUPPRESS)
    p.add_argument("--inductor", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--save", default="", help=argparse.SUPPRESS)
    p.add_argument("--load", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.last_batch, json.loads(args.inductor),
                               args.save or None, args.load or None)))
        return 0
    import platform

    import torch

    rows = run([w.strip() for w in args.workloads.split(",") if w.strip()], args.steps, args.last_batch,
               args.variant, args.timeout, phases=tuple(args.phases.split(",")))
    print(f"compile_time  torch {torch.__version__}  {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}  steps {args.steps}")
    print(table(rows, args.last_batch))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
