"""Experiment: can a warm start skip Dynamo's tracing of the fused step (issue 15, "Compile time")?

Route tried: ``torch.compile(core, fullgraph=True).aot_compile(example_inputs)`` in one process,
``save_compiled_function(path, external_data=...)``, then ``torch.compiler.load_compiled_function``
in a fresh process with the same ``TORCHINDUCTOR_CACHE_DIR`` (or an empty one). The compiled step
is the same function fastloop compiles (``fused_step._make_core``) on the bench workloads' model
and optimizer. Reports seconds to get a callable, the first call, parity with an eager step; the
"compile" phases time today's warm start (plain ``torch.compile``) for comparison. A loaded step
is used only when ``aot_identity_guards.IdentityGuards`` and Dynamo's guards, both evaluated on the
new step's closure, accept it; tiny-mlp also loads for a changed activation and a changed loss
(both must be rejected). Experiment only: fastloop itself does not use this path.

Run:  PYTHONPATH=. python benchmarks/aot_warm_start.py --workload tiny-mlp [--dir D --only save,load]
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(name: str, change: str = "") -> Tuple[Any, Any, tuple, Any]:
    """(model, FusedStep (not compiled), batch, optimizer) for a bench workload, seeded.
    ``change``: "act" (ReLU -> Tanh, same parameters) or "loss" (cross-entropy -> multi-margin):
    a different model whose step must not be served by a graph saved for the original."""
    import torch
    from torch.func import functional_call

    from fastloop.bench.workloads import get_workload
    from fastloop.step.fused_step import build_fused_step

    workload = get_workload(name)
    model = workload.model(0)
    if change == "act":
        model = torch.nn.Sequential(*[torch.nn.Tanh() if isinstance(m, torch.nn.ReLU) else m for m in model])
    opt = workload.make_optimizer(model.parameters())
    x, y = workload.batches(1, 0, torch.device("cpu"))[0]
    loss = torch.nn.functional.multi_margin_loss if change == "loss" else workload.loss_fn

    def loss_fn(params, buffers, xb, yb):
        return loss(functional_call(model, {**params, **buffers}, (xb,)), yb), ()

    trainable = [n for n, _ in model.named_parameters()]
    step, reason = build_fused_step(loss_fn, model, trainable, opt, compile=False)
    assert step is not None, reason
    return model, step, (x, y), opt


def _core_and_args(step: Any, batch: tuple) -> Tuple[Any, tuple]:
    from fastloop.step.fused_step import _make_core

    core = _make_core(*step._core_args, do_update=True, **step._core_kwargs)
    train, frozen, buffers, grads, opt_inputs, scaler_state, nonfinite_state, flag, b = step.call_args(batch, True)
    return core, (train, frozen, buffers, grads, opt_inputs, flag, scaler_state, nonfinite_state, b)


def child(name: str, path: str, mode: str, change: str = "") -> Dict[str, Any]:
    import torch

    from fastloop.step._compile import with_fresh_code
    from aot_identity_guards import IdentityGuards

    identity = IdentityGuards()

    torch.manual_seed(0)
    model, step, batch, opt = _setup(name, change)
    core, args = _core_and_args(step, batch)
    # What the pickler must not copy: the live model and optimizer (their tensors are the step's).
    external = {"model": model, "optimizer": opt, "fopt": step.functional_optimizer}
    out: Dict[str, Any] = {"workload": name, "mode": mode, "change": change}
    save = mode == "save"
    start = time.perf_counter()
    cpu0 = time.process_time()
    if mode == "compile":  # today's warm start: torch.compile, Dynamo traces, caches serve the rest
        fn = torch.compile(with_fresh_code(core), backend="inductor", fullgraph=True, dynamic=False)
        fn.fn = fn
    elif save:
        compiled = torch.compile(with_fresh_code(core), backend="inductor", fullgraph=True, dynamic=False,
                                 options={"guard_filter_fn": identity.filter})
        with torch.no_grad():  # the step is called under no_grad: a global-state guard
            fn = compiled.aot_compile((args, {}))
        out["aot_compile_s"] = time.perf_counter() - start
        t = time.perf_counter()
        fn.save_compiled_function(path, external_data=external)
        with open(path + ".identity", "w") as f:
            json.dump(identity.entries, f)
        out["identity_guards"] = len(identity.entries)
        out["save_s"] = time.perf_counter() - t
    else:
        from torch._guards import TracingContext, tracing

        # Unpickling the guards builds an ImportSource, whose __post_init__ installs a guard
        # into the current trace (torch 2.13): give it one.
        with open(path, "rb") as f, tracing(TracingContext(None)):
            fn = torch.compiler.load_compiled_function(f, external_data=external)
        if os.path.exists(path + ".identity"):
            with open(path + ".identity") as f:
                identity = IdentityGuards([(n, tuple(d)) for n, d in json.load(f)])
        t = time.perf_counter()
        # The NEW step's closure and arguments (the loaded function runs its saved closure copy).
        f_locals = {n: c.cell_contents for n, c in zip(core.__code__.co_freevars, core.__closure__ or ())}
        f_locals.update(inspect.signature(core).bind(*args).arguments)
        why = identity.check(f_locals, core.__globals__)
        # Dynamo's own (portable) guards, on the new closure too: the loaded function's
        # guard_check would read its saved closure copy and pass whatever changed there.
        with torch.no_grad():  # the global state the step is called in
            if not why and not fn._artifacts.guard_manager.check(f_locals):
                why = str(fn._artifacts.guard_manager.check_verbose(f_locals).verbose_code_parts)
        out["identity_check_us"] = (time.perf_counter() - t) * 1e6
        out["load_s"] = time.perf_counter() - start
        if why:
            out["identity_rejects"] = why
            return out
    out["ready_cpu_s"] = time.process_time() - cpu0
    t = time.perf_counter()
    with torch.no_grad():
        loss, _ = fn(*args)
    step.after_call(True)
    out["first_call_s"] = time.perf_counter() - t
    out["ready_and_first_call_s"] = time.perf_counter() - start
    out["ready_and_first_call_cpu_s"] = time.process_time() - cpu0
    out["loss"] = float(loss)
    # Parity against the same step run eagerly (uncompiled core) from the same seed.
    torch.manual_seed(0)
    model2, step2, batch2, _ = _setup(name, change)
    core2, args2 = _core_and_args(step2, batch2)
    with torch.no_grad():
        loss2, _ = core2(*args2)
    out["loss_eager"] = float(loss2)
    out["max_param_diff"] = max(float((a - b).abs().max()) for a, b in zip(model.parameters(), model2.parameters()))
    # Per call, CPU seconds of this thread: with the guard check, and the bare function without it.
    for key, call in (("call_cpu_us", fn), ("call_cpu_us_no_guards", fn.fn)):
        t = time.thread_time()
        for _ in range(50):
            with torch.no_grad():
                call(*_core_and_args(step, batch)[1])
            step.after_call(True)
        out[key] = (time.thread_time() - t) / 50 * 1e6
    if mode == "compile":  # another shape would just recompile
        return out
    # A guard must reject a batch of another shape (the loaded function keeps its guards).
    try:
        with torch.no_grad():
            fn(*_core_and_args(step, tuple(t[: t.shape[0] // 2] for t in batch))[1])
        out["guard_rejects_other_shape"] = False
    except RuntimeError as exc:
        out["guard_rejects_other_shape"] = "GuardManager check failed" in str(exc)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workload", default="tiny-mlp")
    p.add_argument("--child", choices=["save", "load", "compile"])
    p.add_argument("--path", default="")
    p.add_argument("--dir", default="", help="keep the caches and the saved step here (reuse them)")
    p.add_argument("--only", default="", help="comma-separated phases to run: save,load,compile")
    p.add_argument("--change", default="", choices=["", "act", "loss"])
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.workload, args.path, args.child, args.change)))
        return 0
    with (contextlib.nullcontext(args.dir) if args.dir else tempfile.TemporaryDirectory()) as tmp:
        path = os.path.join(tmp, "step.aot")
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.path.join(tmp, "cache"), "PYTHONPATH": ROOT}
        # "compile" twice in its own cache directory: cold, then today's warm start (Dynamo traces,
        # the FX-graph and AOTAutograd caches serve the rest); aot_compile's cache entries are
        # keyed differently, so they cannot serve it.
        phases = [("save", "cache", ""), ("load", "cache", ""), ("load", "fresh-cache", ""),
                  ("compile", "compile-cache", ""), ("compile", "compile-cache", "")]
        if args.workload == "tiny-mlp":  # a different model must not be served the saved step
            phases += [("load", "cache", "act"), ("load", "cache", "loss")]
        if args.only:
            phases = [p for p in phases if p[0] in args.only.split(",")]
        for phase, cache, change in phases:
            env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, cache)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--workload", args.workload, "--child", phase,
                                   "--path", path, "--change", change], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode:
                why = [line for line in proc.stderr.splitlines() if "Error" in line or "verbose_code_parts" in line]
                print(f"{phase} ({cache}, change {change!r}) failed: {why[-2:]}")
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{phase:4s} {cache:11s} process {wall:5.1f}s  {json.dumps(row)}  load avg {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
