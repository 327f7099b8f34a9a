"""The one place that turns a mode into step functions. Loops never branch on the mode.

``build_train_step(loop)`` returns the automatic-optimization step of an ``OptimizerLoop``;
``build_eval_step(loop)`` the step of an evaluation or prediction loop. Both run once when an
entry point starts, decide what can be fused, and record a ``StepReport`` on the loop: the
mode requested, the mode used and, for every fallback, the reason in plain words.

``auto`` means: the CUDA-graph step on a GPU, the compiled step on a CPU, eager where neither
can serve; on a CPU the compiled step must also beat the eager one over the first steps after
its compile (``step/auto_choice.py``), or the loop runs eagerly. Hooks that only observe a step
run outside the fused graph; hooks that change it (listed in ``STEP_CHANGING_HOOKS``) make that
loop run eagerly.

The loop is reached through ``StepLoop`` (``step/loop_protocol.py``): the loops import this
package, never the reverse.
"""
from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, List, Tuple

from fastloop.step.eager import EagerEvalStep, eager_train_step
from fastloop.step.inspect_fn import (
    is_generator_function,
    positional_argument_use,
    python_side_effects,
    reads_attributes,
)
from fastloop.step.loop_protocol import StepLoop

log = logging.getLogger(__name__)

# Hooks that can change what a step computes: overriding one keeps that loop eager.
STEP_CHANGING_HOOKS = (
    "optimizer_step", "optimizer_zero_grad", "backward", "configure_gradient_clipping",
    "on_after_backward", "on_before_optimizer_step",
)
# Module attributes whose values change during a run: a training_step reading one keeps every
# call of its graph behind torch.compile's guards (no direct call, see step/direct_call.py).
RUN_STATE_ATTRIBUTES = ("current_epoch", "global_step", "trainer")
# OptimizerLoop extension points: a subclass overriding one of them defines its own step.
_LOOP_EXTENSION_POINTS = ("make_step_fn", "call_training_step", "backward_kwargs")


@dataclass
class StepReport:
    requested: str
    used: str
    reasons: List[str] = field(default_factory=list)

    step: Any = None  # the step object, for its compile statistics
    events: List[str] = field(default_factory=list)  # why the step was rebuilt during the run

    def describe(self) -> str:
        text = self.used if self.used == self.requested else f"{self.used} (requested {self.requested})"
        graphs = getattr(self.step, "graph_count", None)
        if self.used != "eager" and graphs is not None:
            text += f" [{graphs} graph(s), first-step compile {getattr(self.step, 'compile_seconds', 0.0):.1f} s]"
        for reason in self.reasons:
            text += f"\n    fallback: {reason}"
        for note in getattr(self.step, "notes", ()):
            text += f"\n    note: {note}"
        for event in self.events:
            text += f"\n    rebuilt: {event}"
        return text


def target_mode(trainer: Any) -> str:
    """The mode ``auto`` stands for on this device."""
    if trainer.mode != "auto":
        return trainer.mode
    return "cudagraph" if trainer.device.type == "cuda" else "compiled"


def _report(loop: Any, requested: str, used: str, reasons: List[str]) -> None:
    loop.step_report = StepReport(requested, used, list(reasons))
    if reasons:
        log.info("%s runs %s: %s", type(loop).__name__, used, "; ".join(reasons))
    if reasons and requested != "auto":
        warnings.warn(
            f"fastloop: {type(loop).__name__} runs {'eagerly' if used == 'eager' else used}: " + "; ".join(reasons),
            RuntimeWarning, stacklevel=4,
        )


def batch_idx_blocker(hook: str, fn: Callable[..., Any]) -> str:
    """Why ``fn`` (a step hook called as ``fn(batch, batch_idx, ...)``) cannot be fused for its
    ``batch_idx`` ('' if it never reads it: handed on unused to a helper of the module, one or two
    calls deep, counts as unused; the fused step then passes 0)."""
    use = positional_argument_use(fn, 1)
    if not use:
        return ""
    return f"{hook} reads batch_idx ({use}), a Python int that would recompile the graph every batch"


def train_step_blockers(loop: StepLoop) -> List[str]:
    """Why this loop's automatic-optimization step cannot be fused (empty: it can)."""
    trainer = loop.trainer
    module = trainer.module
    reasons: List[str] = []
    if not module.automatic_optimization:
        reasons.append("manual optimization: training_step steps the optimizers itself")
        return reasons
    for name in loop.overridden_extension_points():
        if name in _LOOP_EXTENSION_POINTS:
            reasons.append(f"optimizer loop {type(loop).__name__} overrides {name}")
    blocker = ("training_step is a generator" if is_generator_function(module.training_step)
               else batch_idx_blocker("training_step", module.training_step))
    if blocker:
        reasons.append(blocker)
    for hook in STEP_CHANGING_HOOKS:
        owners = trainer.hooks.overridden_by(hook)
        if owners:
            reasons.append(f"{hook} is overridden by {', '.join(owners)} and cannot run inside the fused graph")
    if trainer.config.precision != "32" and trainer.device.type == "cpu":
        reasons.append(f"precision {trainer.config.precision} has no fused CPU step")
    if getattr(trainer, "detect_anomaly", False):
        reasons.append("detect_anomaly=True: autograd's anomaly mode checks each backward op, which runs eagerly")
    # Under DDP the fused step all-reduces its gradients in the graph (fastloop/distributed/grad_sync.py).
    reasons.extend(frozen_parameter_blockers(trainer))
    reasons.extend(module_blockers(trainer))
    return reasons


def frozen_parameter_blockers(trainer: Any) -> List[str]:
    """An optimizer holding a parameter with ``requires_grad=False``: eager skips it (its grad
    stays None) while the fused update would move it (weight decay, momentum), so keep eager."""
    reasons = []
    names = {id(p): n for n, p in trainer.module.named_parameters()}
    for idx, optimizer in enumerate(trainer.optimizers):
        frozen = [names.get(id(p), "?") for g in optimizer.param_groups for p in g["params"] if not p.requires_grad]
        if frozen:
            shown = ", ".join(frozen[:3]) + (f" and {len(frozen) - 3} more" if len(frozen) > 3 else "")
            reasons.append(f"optimizer {idx} holds frozen parameters (requires_grad=False: {shown}), which the "
                           "fused update would change")
    return reasons


def module_blockers(trainer: Any) -> List[str]:
    """Why no step of this module can be compiled, training or evaluation."""
    reasons = []
    metrics = metric_objects(trainer.module)
    if metrics:
        reasons.append(
            f"the module holds torchmetrics Metric(s) {', '.join(metrics)}: their state updates are Python side "
            "effects that a compiled graph would not repeat"
        )
    return reasons


def metric_objects(module: Any) -> List[str]:
    """Names of the torchmetrics ``Metric`` submodules of ``module`` (none if torchmetrics is not loaded)."""
    torchmetrics = sys.modules.get("torchmetrics")
    if torchmetrics is None:
        return []
    return [name for name, sub in module.named_modules() if isinstance(sub, torchmetrics.Metric)]


def trainable_flags(module: Any) -> Tuple[bool, ...]:
    """``requires_grad`` of every parameter: the training step is built for these."""
    return tuple(p.requires_grad for p in module.parameters())


def rebuild_train_step(loop: StepLoop, before: Tuple[bool, ...], after: Tuple[bool, ...]) -> Callable[..., Any]:
    """The step again, for parameters whose ``requires_grad`` changed since it was built (a fused
    step would keep updating a parameter frozen since); the report says which and when."""
    if loop.trainer.mode == "eager":  # nothing fused, nothing to rebuild
        return loop.train_step
    names = [name for name, _ in loop.trainer.module.named_parameters()]
    changed = [f"{n} {'frozen' if was else 'unfrozen'}" for n, was, now in zip(names, before, after) if was != now]
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    old = getattr(loop, "step_report", None)
    events = list(old.events) if old is not None else []
    step = build_train_step(loop)
    loop.step_report.events = events + [
        f"at epoch {loop.trainer.current_epoch}: requires_grad changed ({shown}) since the step was built"]
    return step


def build_train_step(loop: StepLoop) -> Callable[..., Any]:
    trainer = loop.trainer
    requested = trainer.mode
    mode = target_mode(trainer)
    if mode == "eager":
        return _eager(loop, requested, [])
    reasons = train_step_blockers(loop)
    fused = ({}, {}) if reasons else _build_fused(loop, reasons)
    if reasons:
        return _eager(loop, requested, reasons)
    from fastloop.step.compiled import CompiledTrainStep

    fused, layouts = fused
    if mode == "cudagraph":
        from fastloop.step.cudagraph import build_cudagraph_train_step

        step, why = build_cudagraph_train_step(loop, fused, layouts)
        if step is not None:
            _report(loop, requested, "cudagraph", [])
            return step
        reasons.append(why)
    _report(loop, requested, "compiled", reasons)
    step = CompiledTrainStep(loop, fused, layouts)
    loop.step_report.step = step
    if requested == "auto" and trainer.device.type == "cpu" and not _distributed():  # see step/auto_choice.py
        from fastloop.step.auto_choice import AutoChoiceStep

        loop.step_report.step = AutoChoiceStep(loop, step, eager_train_step(loop))
        return loop.step_report.step
    return step


def _distributed() -> bool:
    """Several processes: each would time its own steps and could choose differently from the
    others (eager DDP and the fused step's in-graph all-reduce do not meet), so ``auto`` keeps the
    compiled step there without measuring."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _eager(loop: StepLoop, requested: str, reasons: List[str]) -> Callable[..., Any]:
    """The eager step, reported (with the fallback ``reasons``, if any) for ``explain()``."""
    _report(loop, requested, "eager", reasons)
    loop.step_report.step = eager_train_step(loop)
    return loop.step_report.step


def direct_call_blocker(training_step: Callable[..., Any]) -> str:
    """Why calls of this ``training_step``'s graph must stay behind torch.compile's guards
    ('' if a direct call may serve them): it reads run state that changes, or it has Python side
    effects, which Dynamo replays on every call and a direct call would skip."""
    run_state = reads_attributes(training_step, RUN_STATE_ATTRIBUTES)
    if run_state:
        return (f"training_step reads self.{'/'.join(run_state)}, which changes during the run; "
                "torch.compile's guards check it on every call")
    effects = python_side_effects(training_step)
    if effects:
        return (f"training_step {', '.join(effects)}: a Python side effect that torch.compile replays on every "
                "call and a direct call would skip")
    return ""


def _build_fused(loop: StepLoop, reasons: List[str]) -> Any:
    """One fused step (and its log layout) per optimizer, or ``({}, {})`` with reasons added."""
    from fastloop.distributed.grad_sync import broadcast_module_state, distributed_grad_sync
    from fastloop.step.compiled import LogLayout, make_loss_fn
    from fastloop.step.fused_step import build_fused_step

    trainer = loop.trainer
    module = trainer.module
    names = {id(p): n for n, p in module.named_parameters()}
    several = len(trainer.optimizers) > 1
    guarded_because = direct_call_blocker(module.training_step) if trainer.config.compile.direct_call else ""
    grad_sync = distributed_grad_sync()  # compiled DDP: the graphs all-reduce their gradients
    if grad_sync is not None:
        broadcast_module_state(module, grad_sync)  # rank 0's parameters and buffers, as DDP's constructor
    fused, layouts = {}, {}
    for idx, optimizer in enumerate(trainer.optimizers):
        owned = [p for group in optimizer.param_groups for p in group["params"]]
        foreign = [p for p in owned if id(p) not in names]
        if foreign:
            reasons.append(f"optimizer {idx} holds {len(foreign)} tensors that are not parameters of the module")
            return {}, {}
        layouts[idx] = LogLayout()
        step, why = build_fused_step(
            make_loss_fn(module, trainer.metrics, idx if several else None, layouts[idx]), module,
            [names[id(p)] for p in owned], optimizer,
            clip_val=trainer.gradient_clip_val or None, clip_algorithm=trainer.gradient_clip_algorithm,
            accumulate=trainer.accumulate_grad_batches, compile=True,
            inductor_config=trainer.config.compile.inductor_config,
            precision=trainer.config.precision, triton_kernels=trainer.config.compile.triton_kernels,
            step_on_device=target_mode(trainer) == "cudagraph",
            direct_call=trainer.config.compile.direct_call and not guarded_because,
            nonfinite=trainer.config.nonfinite, grad_sync=grad_sync,
        )
        if step is None:
            reasons.append(why or f"optimizer {idx} cannot be fused")
            return {}, {}
        if guarded_because:
            step.direct_reason = guarded_because
        fused[idx] = step
    return fused, layouts


def build_eval_step(loop: Any) -> Callable[..., Any]:
    trainer = loop.trainer
    requested = trainer.mode
    mode = target_mode(trainer)
    if mode == "eager":
        _report(loop, requested, "eager", [])
        return EagerEvalStep(loop)
    reasons = module_blockers(trainer)
    module = trainer.module
    for hook in ("validation_step", "test_step", "predict_step"):
        blocker = batch_idx_blocker(hook, getattr(module, hook)) if trainer.hooks.module_overrides(hook) else ""
        if blocker:
            reasons.append(blocker)
    if reasons:
        _report(loop, requested, "eager", reasons)
        return EagerEvalStep(loop)
    from fastloop.step._compile import CountingBackend
    from fastloop.step.compiled import CompiledEvalStep

    _report(loop, requested, "compiled", [] if mode == "compiled" else [
        "evaluation steps run compiled; CUDA graphs capture training steps only"])
    step = CompiledEvalStep(loop, CountingBackend(trainer.config.compile.inductor_config))
    loop.step_report.step = step
    return step
