"""One fused training step per optimizer: forward, backward, accumulation, clipping, update.

The step is a single ``torch.compile(fullgraph=True)`` graph, built from
``torch.func.grad_and_value`` over the caller's functional loss plus the
functional optimizer update (see ``functional_optim``). Per optimizer there are
at most two compiled functions, picked by a Python bool from the loop:

* ``step=False``: accumulate-only (forward, backward, ``p.grad += g``);
* ``step=True``: accumulate, clip, optimizer update.

Semantics match the eager loop ``loss / accumulate -> backward -> clip ->
optimizer.step() -> zero_grad()`` except that gradients are zeroed at the start
of the next window rather than after the step, so ``p.grad`` still holds the
gradient that was used after a stepping call (as it does in eager after
``optimizer.step()``).

Everything that varies between calls is a graph input (parameters, buffers,
gradients, optimizer state, the optimizer's scalar table, a "new window"
flag), so an LR scheduler never recompiles; a batch of another shape costs one
extra graph (``dynamic=False``: shapes stay static and kernels specialised). The training
loop's compiled step runs a smaller last batch of an epoch eagerly instead (see
``last_batch``).
There is no host-device synchronisation per call.

Known limitations (each makes the build or the first call fail, or costs a graph):

* Anything that breaks ``fullgraph`` in ``loss_fn``: ``.item()``/``float(t)``,
  printing tensors, data-dependent Python ``if``, BatchNorm with
  ``momentum=None`` (it reads ``num_batches_tracked`` as a Python float),
  storing tensors created inside the transform on the module (return logged
  values through ``aux`` instead).
* Changing module state that Dynamo guards (``train()``/``eval()``, hooks)
  recompiles; replacing the module's tensors (``.to()``, ``load_state_dict``
  with ``assign=True``) needs a rebuild (the step keeps aliases of them).
* Parameters the loss does not use get a zero gradient and are still updated
  (eager would skip them because their ``.grad`` is ``None``).
* One device per step; the CUDA path is written (no syncs, device scalar
  table) but has not been run here.

Non-finite losses and gradients (``nonfinite="raise"``/``"skip"``, see ``nonfinite``): the
stepping graph checks the loss (and the losses of the window's accumulating calls) and the
accumulated gradients before clipping, and applies the update through
``torch.where(ok, new, old)`` for the parameters and every optimizer state tensor, all on the
device; ``FusedStep.nonfinite_state`` holds the counters the host reads now and then.

Under ``torch.distributed`` (``grad_sync``, see ``fastloop.distributed.grad_sync``): the stepping
graph all-reduces (mean) the accumulated gradients, one flat buffer per dtype, right after
accumulation and before the non-finite check, clipping and the update; accumulating calls do not
communicate. A bad loss on any rank withholds the update on every rank. Buffers are broadcast
from rank 0 (host side) before the call that opens an accumulation window, as DDP does.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ._compile import CountingBackend, compile_fullgraph
from .cpu_inductor import cpu_step_options
from .direct_call import DirectCall, call_key
from .functional_optim import FunctionalOptimizer, make_functional_optimizer
from .grad_clip import clip_grads, clip_grads_triton
from .nonfinite import WINDOW, check_step, new_state, note_window_loss
from .precision import DeviceLossScaler, autocast
from .conv_layout import conv_weight_names, single_channel_last, with_channels_last
from .recurrent import RecurrentSwap, recurrent_blockers

if TYPE_CHECKING:
    from fastloop.distributed.grad_sync import GradSync

__all__ = ["FusedStep", "build_fused_step", "LossFn"]

# Distinct (stepping?, batch shape, module mode) keys served directly per step; more go through Dynamo.
_MAX_DIRECT_CALLS = 8

# loss_fn(params, buffers, *batch) -> (loss, aux)
LossFn = Callable[..., tuple[Tensor, Any]]


def build_fused_step(
    loss_fn: LossFn,
    module: nn.Module,
    trainable: Sequence[str],
    optimizer: torch.optim.Optimizer,
    *,
    clip_val: Optional[float] = None,
    clip_algorithm: str = "norm",
    accumulate: int = 1,
    compile: bool = True,
    inductor_config: Optional[dict[str, Any]] = None,
    precision: str = "32",
    triton_kernels: bool = False,
    step_on_device: bool = False,
    direct_call: bool = True,
    nonfinite: str = "ignore",
    grad_sync: Optional[GradSync] = None,
) -> tuple[Optional["FusedStep"], Optional[str]]:
    """Build the fused step for one optimizer.

    Args:
        loss_fn: ``loss_fn(params, buffers, *batch) -> (loss, aux)``; ``params``
            and ``buffers`` map the module's qualified names to tensors (all
            parameters, trainable or not), typically fed to
            ``torch.func.functional_call``. ``aux`` is a pytree of tensors (logged
            values); it is returned detached. It must not stash tensors anywhere
            that outlives the call.
        module: the module whose parameters/buffers the names refer to. Its
            buffers (BatchNorm running stats) are updated in place, as in eager.
        trainable: names of the parameters this optimizer updates. Other
            parameters are passed as constants (not differentiated).
        optimizer: SGD, Adam or AdamW (see ``make_functional_optimizer``).
        clip_val: gradient clipping threshold, or None for no clipping.
        clip_algorithm: ``"norm"`` (L2, ``clip_grad_norm_``) or ``"value"``.
        accumulate: micro-batches per optimizer step; the loss is divided by it.
        compile: False runs the same functional code eagerly (debugging, fast tests).
        inductor_config: inductor options applied while compiling (e.g.
            ``{"fallback_random": True}`` for eager-identical dropout masks).
        precision: ``"32"``, ``"bf16-mixed"`` (forward under bf16 autocast) or
            ``"16-mixed"`` (fp16 autocast plus a device-side loss scale whose
            overflow check skips the update with ``torch.where``; see ``precision``).
        triton_kernels: use the fused Triton kernels for the optimizer update and
            for gradient clipping when ``fastloop.kernels.triton_available()``;
            otherwise (and by default) the pure-torch code runs.
            ``FusedStep.triton_reason`` says why they are not used.
        step_on_device: keep Adam's step count on the parameters' device (needed
            by CUDA-graph capture; see ``make_functional_optimizer``).
        direct_call: once a graph has run, call it directly while its inputs match,
            skipping torch.compile's per-call wrapper (see ``direct_call``).
            ``FusedStep.direct_reason`` says why a step still goes through it.
        nonfinite: ``"raise"`` or ``"skip"``: check loss and gradients in the graph and never
            apply a non-finite update (``"skip"`` also zeroes the gradients of such a step);
            ``"ignore"`` (this function's default; the Trainer's is ``"raise"``): no check.
        grad_sync: under ``torch.distributed``, the collectives that keep the ranks equal (the
            stepping graph all-reduces the gradients); None in one process.

    Returns:
        ``(FusedStep, None)``, or ``(None, reason)`` when this optimizer or
        configuration cannot be fused; ``reason`` is a readable sentence and the
        caller should use the eager step.
    """
    if accumulate < 1:
        return None, f"accumulate must be >= 1, got {accumulate}"
    if clip_val is not None and clip_algorithm not in ("norm", "value"):
        return None, f"clip_algorithm {clip_algorithm!r} is not 'norm' or 'value'"
    named = dict(module.named_parameters())
    missing = [n for n in trainable if n not in named]
    if missing:
        return None, f"trainable names not found among the module's parameters: {missing}"
    if len(set(trainable)) != len(trainable):
        return None, "trainable names contain duplicates"
    params = [named[n] for n in trainable]
    if precision not in ("32", "bf16-mixed", "16-mixed"):
        return None, f"precision {precision!r} is not '32', 'bf16-mixed' or '16-mixed'"
    if nonfinite not in ("raise", "skip", "ignore"):
        return None, f"nonfinite {nonfinite!r} is not 'raise', 'skip' or 'ignore'"
    if compile and recurrent_blockers(module):  # see recurrent.py
        return None, "; ".join(recurrent_blockers(module))
    fopt, reason = make_functional_optimizer(optimizer, params, step_on_device=step_on_device,
                                             use_triton=triton_kernels)
    if fopt is None:
        return None, reason
    return FusedStep(loss_fn, module, list(trainable), fopt, clip_val, clip_algorithm,
                     accumulate, compile, inductor_config, precision=precision,
                     triton_clip=triton_kernels and fopt.use_triton, direct_call=direct_call,
                     nonfinite=nonfinite, grad_sync=grad_sync), None


def _detach(tree: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


def _make_core(
    loss_fn: LossFn,
    fopt: FunctionalOptimizer,
    accumulate: int,
    clip_val: Optional[float],
    clip_algorithm: str,
    do_update: bool,
    device_type: str = "cpu",
    precision: str = "32",
    triton_clip: bool = False,
    scaler: Optional[DeviceLossScaler] = None,
    nonfinite: str = "ignore",
    grad_sync: Optional[GradSync] = None,
    channels_last: frozenset = frozenset(),
) -> Callable:
    """The pure function that is compiled: all state comes in as arguments.

    ``channels_last``: names of convolution weights the graph uses in channels_last layout (see
    ``conv_layout``; ``FusedStep.call_args`` restrides one-channel batch images to match).

    ``scaler_state`` is ``()`` or ``(scale, growth_tracker)`` of a ``DeviceLossScaler``
    (fp16): the loss is multiplied by ``scale`` before differentiation, gradients are kept
    scaled while accumulating (as ``GradScaler`` leaves ``.grad``), and the stepping call
    unscales them, skips the whole update (parameters and optimizer state) where a
    gradient is inf/nan, and updates the scale, all with tensor ops.

    ``nonfinite_state`` is ``()`` (``nonfinite="ignore"``) or ``(state,)``, the int64 counters of
    ``nonfinite.check_step``: a bad loss or gradient withholds the update the same way.

    ``grad_sync``: the stepping call all-reduces the accumulated gradients (mean over ranks)
    before the check; the loss it checks is made NaN where any rank's window had a bad loss.
    """

    def objective(train, frozen, buffers, batch, scale):
        # Buffers are an argument of the transformed function: BatchNorm's
        # in-place running-stat update on a captured tensor would be rejected.
        with autocast(device_type, precision):
            params = {**frozen, **train}
            if channels_last:  # conv weights channels_last (see conv_layout)
                params = with_channels_last(params, channels_last)
            loss, aux = loss_fn(params, buffers, *batch)
        scaled = loss / accumulate if accumulate > 1 else loss
        if scale is not None:
            scaled = scaled.float() * scale
        return scaled, (loss.detach(), _detach(aux))

    def fused_step(train, frozen, buffers, grads, opt_inputs, new_window, scaler_state, nonfinite_state, batch):
        scale = scaler_state[0] if scaler_state else None
        new, (_, (loss, aux)) = torch.func.grad_and_value(objective, has_aux=True)(
            train, frozen, buffers, batch, scale
        )
        with torch.no_grad():
            total = list(new.values())  # same order as `train` and `grads`
            if accumulate > 1:
                # Zero at the start of a window without a data-dependent branch.
                total = [torch.where(new_window, t, g + t) for g, t in zip(grads, total)]
            checked_loss = loss
            if do_update and grad_sync is not None:
                total, checked_loss = _all_reduce(grad_sync, total, loss, new_window, nonfinite_state, accumulate)
            withhold = None
            if nonfinite_state and not do_update:
                note_window_loss(nonfinite_state[0], loss, new_window)
            elif nonfinite_state:
                # Before unscaling and clipping; under a loss scaler only the loss (see nonfinite).
                withhold = check_step(nonfinite_state[0], checked_loss, total, new_window, accumulate=accumulate,
                                      check_grads=scale is None, latch=nonfinite == "raise")
            found = None
            if do_update and scale is not None:
                total, found = DeviceLossScaler.unscale(total, scale)
            if do_update and clip_val is not None:
                if triton_clip:
                    total, _ = clip_grads_triton(total, clip_val, clip_algorithm)
                else:
                    total = clip_grads(total, clip_val, clip_algorithm)
            if withhold is not None and nonfinite == "skip":
                total = [torch.where(withhold, torch.zeros_like(t), t) for t in total]  # cleared
            for g, t in zip(grads, total):
                g.copy_(t)
            if do_update:
                params = list(train.values())
                skip = found if withhold is None else (withhold if found is None else found | withhold)
                if skip is None:
                    fopt.update(params, grads, opt_inputs)
                else:
                    # Skip without a branch: update, then put the old values back where `skip`
                    # (inductor fuses this; no host sync).
                    touched = params + fopt.state_tensors(opt_inputs)
                    before = [t.clone() for t in touched]
                    fopt.update(params, grads, opt_inputs)
                    for t, old in zip(touched, before):
                        t.copy_(torch.where(skip, old, t))
                if found is not None:
                    scaler.update(scaler_state[0], scaler_state[1], found)
        return loss, aux

    return fused_step


def _all_reduce(grad_sync: "GradSync", total: list, loss: Tensor, new_window: Tensor, nonfinite_state: tuple,
                accumulate: int) -> tuple[list, Tensor]:
    """Traced: the mean of the accumulated gradients over the ranks, and the loss the non-finite
    check should see (NaN where the window's loss was bad on any rank, so all ranks agree)."""
    if not nonfinite_state:
        return grad_sync.all_reduce_mean(total)[0], loss
    bad = torch.logical_not(torch.isfinite(loss))
    if accumulate > 1:  # an accumulating call of this window saw a bad loss
        bad = bad | ((nonfinite_state[0][WINDOW] != 0) & torch.logical_not(new_window))
    total, any_bad = grad_sync.all_reduce_mean(total, bad)
    return total, torch.where(any_bad, torch.full_like(loss, float("nan")), loss)


class FusedStep:
    """A callable fused training step for one optimizer.

    ``step(*batch, step=True) -> (loss, aux)``: ``loss`` is the undivided loss
    ``loss_fn`` returned (detached), ``aux`` its detached aux pytree. No host
    synchronisation happens per call.

    Attributes:
        compile_seconds: wall time of the calls that compiled a graph (first
            call of each function, plus any recompile), in seconds.
        graph_count: graphs compiled so far (0 when ``compile=False``).
        calls, direct_calls: calls so far, and those that ran a compiled graph directly
            (``direct_call``).
        direct_reason: why calls go through torch.compile's guards every time ('' if not).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        module: nn.Module,
        trainable: list[str],
        fopt: FunctionalOptimizer,
        clip_val: Optional[float],
        clip_algorithm: str,
        accumulate: int,
        compile: bool,
        inductor_config: Optional[dict[str, Any]] = None,
        precision: str = "32",
        triton_clip: bool = False,
        direct_call: bool = True,
        nonfinite: str = "ignore",
        grad_sync: Optional[GradSync] = None,
    ) -> None:
        self.module = module
        self.precision = precision
        self.optimizer = fopt.optimizer
        self.functional_optimizer = fopt
        self.accumulate = accumulate
        self.compiled = compile
        self.compile_seconds = 0.0
        named = dict(module.named_parameters())
        # CPU: no OpenMP region for a loop ATen would run serially; C++ wrapper for small models.
        self._backend = CountingBackend(cpu_step_options(module, named[trainable[0]].device, inductor_config))
        self._params = [named[n] for n in trainable]
        # Detached aliases share storage with the parameters: in-place updates
        # reach the module, and the graph sees no autograd-tracked inputs.
        # Rebuild the step if the module's tensors are replaced (e.g. .to()).
        self._train = {n: named[n].detach() for n in trainable}
        self._frozen = {n: p.detach() for n, p in named.items() if n not in self._train}
        self._buffers = dict(module.named_buffers())
        self.grad_sync = grad_sync
        self.sync_buckets = grad_sync.buckets(self._params) if grad_sync is not None else 0
        self._new_window = True
        device = self._params[0].device
        # Two constant flags: passing one or the other is a value change, not a recompile.
        self._true = torch.ones((), dtype=torch.bool, device=device)
        self._false = torch.zeros((), dtype=torch.bool, device=device)
        self._fns: dict[bool, Callable] = {}
        self._free_vars: dict[Callable, dict[str, Any]] = {}
        # Direct calls of the compiled graphs, by (function, call_key); see direct_call.
        self._direct: dict[tuple, DirectCall] = {}
        self.calls = 0  # calls of run()
        self.direct_calls = 0  # of which served by a DirectCall
        self.direct_reason = "" if direct_call else "turned off (CompileConfig.direct_call=False)"
        if not compile:
            self.direct_reason = "not compiled"
        self._backend.record_outputs = not self.direct_reason
        self.scaler = DeviceLossScaler(device) if precision == "16-mixed" else None
        self._scaler_state = self.scaler.tensors() if self.scaler is not None else ()
        self.nonfinite = nonfinite
        # Counters of the device-side non-finite check (see nonfinite.py); None when not checked.
        self.nonfinite_state = new_state(device) if nonfinite != "ignore" else None
        self._nonfinite_args = (self.nonfinite_state,) if self.nonfinite_state is not None else ()
        self.triton_reason = fopt.triton_reason
        self._core_args = (loss_fn, fopt, accumulate, clip_val, clip_algorithm)
        self._core_kwargs = dict(device_type=device.type, precision=precision, triton_clip=triton_clip,
                                 scaler=self.scaler, nonfinite=nonfinite, grad_sync=grad_sync,
                                 channels_last=conv_weight_names(module, device))
        # nn.LSTM/GRU/RNN run as unrolled twins while Dynamo may trace (see recurrent.py).
        self._recurrent = RecurrentSwap(module if compile else nn.Module())

    @property
    def graph_count(self) -> int:
        return self._backend.graphs

    def _fn(self, do_update: bool) -> Callable:
        fn = self._fns.get(do_update)
        if fn is None:
            core = _make_core(*self._core_args, do_update=do_update, **self._core_kwargs)
            fn = compile_fullgraph(core, self._backend) if self.compiled else core
            # Dynamo names tensors reached through the core's closure (a module's plain tensor
            # attribute, say) from these free variables: a direct call reads them there too.
            self._free_vars[fn] = dict(zip(core.__code__.co_freevars,
                                           (cell.cell_contents for cell in core.__closure__ or ())))
            self._fns[do_update] = fn
        return fn

    def _grads(self) -> list[Tensor]:
        grads = []
        for p in self._params:
            if p.grad is None:  # first call, or the user's zero_grad(set_to_none=True)
                p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)
            grads.append(p.grad)
        return grads

    def zero_grad(self) -> None:
        """Start a new accumulation window at the next call (gradients restart from zero)."""
        self._new_window = True

    def set_window_start(self, new_window: bool) -> None:
        """Say whether the next call starts a new accumulation window.

        Standalone use needs no call: a window ends with each update. The training loop sets it
        from ``batch_idx`` the way the eager loop zeroes gradients, so that an optimizer skipped
        by frequencies resumes its window (and keeps its gradients) exactly as in eager mode.
        """
        self._new_window = new_window

    def call_args(self, batch: tuple, step: bool) -> tuple:
        """Host side of one call: the arguments of ``self._fn(step)``, in order.

        Everything but the last two (the new-window flag and the batch) is a persistent
        tensor that is the same object from call to call (what a CUDA graph needs).
        """
        if not step and self.accumulate == 1:
            raise ValueError("step=False (accumulate only) needs accumulate > 1")
        opt_inputs = self.functional_optimizer.prepare() if step else ()
        if self.grad_sync is not None and self._new_window:
            self.grad_sync.broadcast_buffers(list(self._buffers.values()))  # as DDP: rank 0's, per window
        flag = self._true if self._new_window else self._false
        if self._core_kwargs["channels_last"]:  # one-channel images as channels_last views (see conv_layout)
            batch = single_channel_last(batch)
        return (self._train, self._frozen, self._buffers, self._grads(), opt_inputs, self._scaler_state,
                self._nonfinite_args, flag, batch)

    def sync_note(self) -> str:
        """How this step keeps the ranks equal ('' in one process), for ``trainer.explain()``."""
        if self.grad_sync is None:
            return ""
        return self.grad_sync.describe(self.sync_buckets, bool(self._buffers))

    def after_call(self, step: bool) -> None:
        """Host bookkeeping once the call (or a graph replay) was issued."""
        if step:
            self.functional_optimizer.finish()
        self._new_window = step

    def run(self, fn: Callable, args: tuple) -> tuple[Tensor, Any]:
        """Call ``fn`` (the compiled core or anything with its signature) on ``args``.

        A compiled ``fn`` is called directly (``DirectCall``) when a graph already served
        the same key; otherwise through torch.compile, which checks its guards and compiles
        when needed, and the graph it ran becomes the direct call for that key.
        """
        train, frozen, buffers, grads, opt_inputs, scaler_state, nonfinite_state, flag, batch = args
        # fn's signature:
        in_order = (train, frozen, buffers, grads, opt_inputs, flag, scaler_state, nonfinite_state, batch)
        self.calls += 1
        slot = direct = names = None
        if not self.direct_reason:
            # Keyword names: the compiled function's parameters, as Dynamo's input sources name them.
            names = dict(self._free_vars.get(fn, ()), train=train, frozen=frozen, buffers=buffers, grads=grads,
                         opt_inputs=opt_inputs, new_window=flag, scaler_state=scaler_state,
                         nonfinite_state=nonfinite_state, batch=batch)
            slot = (fn, call_key(self.module, batch))
            try:
                direct = self._direct.get(slot)
            except TypeError:  # an unhashable batch leaf (say a numpy array): this call stays guarded
                slot = None
        # Grad mode off as torch.no_grad() does, without its context-manager objects (~4 µs a
        # step on a tiny model); the graphs were compiled under it.
        grad_was = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            if direct is not None:
                out = direct(names)
                if out is not None:
                    self.direct_calls += 1
                    return out
            self._backend.last_invoked = None
            out = self._run_guarded(fn, *in_order)
        finally:
            torch._C._set_grad_enabled(grad_was)
        graph = self._backend.last_invoked
        if slot is not None and graph is not None:
            direct, why = DirectCall.build(graph, names, out)
            graph.last_outputs = None
            if direct is None:
                self.direct_reason = why
                self._backend.record_outputs = False
                self._direct.clear()
            elif len(self._direct) < _MAX_DIRECT_CALLS or slot in self._direct:
                self._direct[slot] = direct
        return out

    def _run_guarded(self, fn: Callable, *args: Any) -> tuple[Tensor, Any]:
        graphs_before = self._backend.graphs
        start = time.perf_counter()
        with self._recurrent:
            out = fn(*args)
        if self._backend.graphs != graphs_before:
            self.compile_seconds += time.perf_counter() - start
        return out

    def __call__(self, *batch: Any, step: bool = True) -> tuple[Tensor, Any]:
        """Run one micro-batch; ``step=True`` also clips and updates the parameters."""
        args = self.call_args(batch, step)
        loss, aux = self.run(self._fn(step), args)
        self.after_call(step)
        return loss, aux
