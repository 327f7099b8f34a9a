"""Traceable, in-place versions of ``torch.optim.SGD``, ``Adam`` and ``AdamW``.

The update is written with tensor ops only, so it can live inside one
``torch.compile(fullgraph=True)`` graph next to the backward pass. Everything
that changes between steps is a tensor input of that graph:

* hyperparameters are read from the user's ``optimizer.param_groups`` on every
  step (so any LR scheduler keeps working, including ``ReduceLROnPlateau``
  writing plain floats); together with the scalar terms that depend on the
  step count (Adam's bias corrections) they are computed on the host in Python
  floats, exactly as torch's single-tensor code does, and handed to the graph
  as one small float64 table (a row per parameter). A new learning rate is a
  new *value* of a graph input, never a recompile. (Computing the bias
  corrections inside the graph was slower on CPU: inductor inlines those
  scalar ``pow`` calls into every element of the update loops.)
* optimizer state lives in ``optimizer.state[p]`` with torch's own keys, dtypes
  and devices, so ``optimizer.state_dict()`` round-trips with eager
  ``optimizer.step()`` in both directions.

Numerics follow torch's single-tensor (``foreach=False``) code path: scalars are
Python floats cast to the parameter dtype where torch casts them. Elementwise
rounding can still differ by an ulp (ATen's CPU kernels use fused multiply-add
in places, inductor chooses its own); after 30 fp32 steps Adam/AdamW parameters
agree with torch to <= 4e-7 relative, SGD to ~1 ulp per step (see the tests).

Per-step protocol (the fused step drives it)::

    inputs = fopt.prepare()                       # Python, outside the graph
    fopt.update(params, grads, inputs)            # tensor ops, inside the graph
    fopt.finish()                                 # Python, outside the graph
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["FunctionalOptimizer", "make_functional_optimizer"]

# Columns of the per-parameter scalar table fed to the graph (float64, one row
# per parameter), computed on the host from param_groups and the step count.
_SGD_COLS = ("lr", "momentum", "one_minus_dampening", "weight_decay")
_ADAM_COLS = ("step_size", "bias_correction2_sqrt", "one_minus_beta1", "beta2", "one_minus_beta2",
              "eps", "weight_decay", "decay_factor", "lr", "beta1")


def make_functional_optimizer(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor], *, step_on_device: bool = False,
    use_triton: bool = False,
) -> tuple[Optional["FunctionalOptimizer"], Optional[str]]:
    """Wrap ``optimizer`` so that its update for ``params`` can be traced.

    Returns ``(FunctionalOptimizer, None)`` when supported, otherwise
    ``(None, reason)`` where ``reason`` is a human-readable sentence saying why
    the caller must fall back to eager ``optimizer.step()``.

    ``params`` are the tensors the fused step will update, in the order in which
    it will pass their gradients; each must belong to one of the optimizer's
    param groups. Optimizer parameters not listed are left alone (as eager
    ``step()`` leaves parameters whose ``.grad`` is ``None``).

    ``step_on_device``: keep Adam's ``state["step"]`` on the parameters' device
    (float32, as torch's capturable Adam does) instead of torch's CPU default. A
    CUDA graph cannot read or update a CPU tensor, so the CUDA-graph step needs
    this. Checkpoints stay loadable everywhere: a device ``step`` is accepted by
    eager ``torch.optim.Adam`` (it reads it with ``.item()``) and by this class
    in the other modes, and a CPU ``step`` loaded later is moved at the next
    :meth:`FunctionalOptimizer.prepare`.

    ``use_triton``: apply the update with ``torch.ops.fastloop.fused_adam`` /
    ``fused_sgd`` (one Triton launch per parameter) instead of tensor ops.
    Needs ``fastloop.kernels.triton_available()``, contiguous parameters and
    ``step_on_device`` semantics for Adam (the kernel reads the step on the
    parameter's device); when they are missing, the pure-torch update is used and
    :attr:`FunctionalOptimizer.triton_reason` says why.
    """
    reason = _unsupported_reason(optimizer, params)
    if reason is not None:
        return None, reason
    return FunctionalOptimizer(optimizer, params, step_on_device=step_on_device, use_triton=use_triton), None


def triton_update_blocker(params: Sequence[Tensor]) -> str:
    """Why the Triton update kernels cannot serve ``params`` ('' when they can)."""
    from fastloop import kernels

    reason = kernels.unavailable_reason()
    if reason:
        return reason
    from fastloop.kernels import ops

    if not ops.REGISTERED:
        return "this torch has no torch.library.custom_op/triton_op to register the kernels"
    for p in params:
        if not p.is_contiguous():
            return "a parameter is not contiguous (the kernels take flat buffers)"
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"the kernels do not handle {p.dtype} parameters"
    return ""


def _unsupported_reason(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Optional[str]:
    """Return why ``optimizer`` cannot be fused, or ``None`` when it can."""
    cls = type(optimizer)
    name = cls.__name__
    if cls not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        # Exact types only: a subclass may override step() with other math.
        return f"optimizer {name} has no fused update (supported: SGD, Adam, AdamW)"
    if getattr(optimizer, "_optimizer_step_pre_hooks", None) or getattr(
        optimizer, "_optimizer_step_post_hooks", None
    ):
        return f"optimizer {name} has step hooks, which a fused update would not run"
    from torch.optim import optimizer as _optim_mod

    if getattr(_optim_mod, "_global_optimizer_pre_hooks", None) or getattr(
        _optim_mod, "_global_optimizer_post_hooks", None
    ):
        return "global optimizer step hooks are registered, which a fused update would not run"
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    if len(params) == 0:
        return "no parameters to update"
    for p in params:
        if id(p) not in owned:
            return "a trainable parameter is not in any of the optimizer's param groups"
        if p.is_complex():
            return "complex parameters are not supported by the fused update"
        if p.is_sparse or p.layout != torch.strided:
            return "sparse or non-strided parameters are not supported by the fused update"
        if not p.is_floating_point():
            return "non-floating-point parameters cannot be optimized"
    for i, g in enumerate(optimizer.param_groups):
        if g.get("differentiable", False):
            return f"{name} with differentiable=True is not supported (group {i})"
        if g.get("fused", False):
            return f"{name} with fused=True keeps its step on the device and uses its own kernel; not reproduced"
        if g.get("capturable", False):
            return f"{name} with capturable=True uses different scalar math and state placement; not reproduced"
        if isinstance(g.get("weight_decay", 0.0), Tensor):
            return f"{name} with a tensor weight_decay is not supported (group {i})"
        if cls is torch.optim.SGD:
            for key in ("momentum", "dampening"):
                if isinstance(g.get(key), Tensor):
                    return f"SGD with a tensor {key} is not supported (group {i})"
        else:
            b1, b2 = g["betas"]
            if isinstance(b1, Tensor) or isinstance(b2, Tensor):
                return f"{name} with tensor betas is not supported (group {i})"
            if isinstance(g.get("eps"), Tensor):
                return f"{name} with a tensor eps is not supported (group {i})"
        lr = g.get("lr")
        if isinstance(lr, Tensor) and lr.numel() != 1:
            return f"{name} with a multi-element tensor lr is not supported (group {i})"
    return None


class FunctionalOptimizer:
    """Traceable in-place update equivalent to ``optimizer.step()``.

    Holds only a few flags; all optimizer state stays in ``optimizer.state``
    and is looked up again on every :meth:`prepare`, so
    ``optimizer.load_state_dict`` at any time is honoured.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], *,
                 step_on_device: bool = False, use_triton: bool = False) -> None:
        self.optimizer = optimizer
        self.step_on_device = step_on_device
        self.kind = "SGD" if isinstance(optimizer, torch.optim.SGD) else "Adam"
        self.columns = _SGD_COLS if self.kind == "SGD" else _ADAM_COLS
        self.params = list(params)
        group_of = {id(p): gi for gi, g in enumerate(optimizer.param_groups) for p in g["params"]}
        # Static per-parameter group index (a Python constant inside the graph).
        self.group_index = [group_of[id(p)] for p in self.params]
        self.used_groups = sorted(set(self.group_index))
        self.structure = {gi: self._structure(optimizer.param_groups[gi]) for gi in self.used_groups}
        self._raw_structure: Optional[list] = None
        self.device = self.params[0].device
        # The scalar table: written on the host through a numpy view (cheaper
        # than building a tensor from a list each step); on CPU it is the graph
        # input itself, elsewhere it is copied to a device tensor.
        shape = (len(self.params), len(self.columns))
        self._scalars_host = torch.zeros(shape, dtype=torch.float64)
        self._scalars_np = self._scalars_host.numpy()
        self._scalars_dev = (
            None if self.device.type == "cpu" else torch.zeros(shape, dtype=torch.float64, device=self.device)
        )
        # SGD: which momentum buffers were just created (torch copies the grad
        # into a new buffer on its first step); a bool tensor so that the first
        # step is a value, not a separate graph. The host sets an entry when it creates
        # the buffer; the update clears the entries (in the graph: a withheld step keeps them).
        self.fresh_buf = torch.zeros(len(self.params), dtype=torch.bool, device=self.device)
        self.triton_reason = triton_update_blocker(self.params) if use_triton else "not requested"
        self.use_triton = use_triton and not self.triton_reason
        if self.use_triton and self.kind == "Adam":
            self.step_on_device = True  # the kernel reads the step next to the parameter
        # Host mirror of each Adam step count, so a device step is not read back every step
        # (Triton kernel: it reads the step itself; pure-torch update: see graph_bias_correction).
        self._host_steps: dict[int, tuple[Tensor, float]] = {}
        # Per parameter, what prepare() needs that never changes: (param, group index, structure).
        self._plan = [(p, gi, self.structure[gi]) for p, gi in zip(self.params, self.group_index)]
        self._last_rows: Optional[list] = None  # the rows the table holds (skip rewriting them)

    @property
    def graph_bias_correction(self) -> bool:
        """Adam's bias corrections computed in the graph from the device step count, not on the host.

        When the step lives on the device (CUDA graphs), a host mirror of it cannot know whether
        the graph withheld a step (loss scaler overflow, non-finite policy) without a sync; the
        device step itself always knows. Float64 math, as torch's host-side Python floats.
        """
        return self.kind == "Adam" and self.step_on_device and not self.use_triton

    # ------------------------------------------------------------------ host side
    def _structure(self, group: dict) -> dict[str, bool]:
        # Structural flags decide which ops (and state keys) exist, so they are
        # baked into the graph; changing one after build is an error, not a recompile.
        if self.kind == "SGD":
            return {
                "maximize": bool(group.get("maximize", False)),
                "nesterov": bool(group.get("nesterov", False)),
                "momentum_nonzero": group["momentum"] != 0,
            }
        return {
            "maximize": bool(group.get("maximize", False)),
            "amsgrad": bool(group.get("amsgrad", False)),
            "decoupled_weight_decay": bool(group.get("decoupled_weight_decay", False))
            or isinstance(self.optimizer, torch.optim.AdamW),
        }

    def _check_structure(self) -> None:
        groups = self.optimizer.param_groups
        k1, k2 = ("nesterov", "momentum") if self.kind == "SGD" else ("amsgrad", "decoupled_weight_decay")
        # Per step: one flat list (no generator expressions), compared with the last one seen.
        raw = [(g.get("maximize"), g.get(k1), g.get(k2)) for g in map(groups.__getitem__, self.used_groups)]
        if raw == self._raw_structure:  # fast path: nothing changed
            return
        for gi in self.used_groups:
            now = self._structure(groups[gi])
            if now != self.structure[gi]:
                raise RuntimeError(
                    f"param group {gi} changed a structural option ({self.structure[gi]} -> {now}) "
                    "after the fused step was built; rebuild it"
                )
        self._raw_structure = raw

    @staticmethod
    def _float(value: Any) -> float:
        # A tensor lr is read as torch's own single-tensor step reads it
        # (.item(): a host-device sync if that tensor lives on a GPU).
        return float(value) if isinstance(value, Tensor) else value

    def _sgd_row(self, group: dict) -> list[float]:
        return [self._float(group["lr"]), group["momentum"], 1 - group["dampening"], group["weight_decay"]]

    def _adam_row(self, group: dict, step: float) -> list[float]:
        # Same Python-float expressions as torch.optim.adam._single_tensor_adam.
        lr = self._float(group["lr"])
        beta1, beta2 = group["betas"]
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        wd = group["weight_decay"]
        return [lr / bias_correction1, bias_correction2**0.5, 1 - beta1, beta2, 1 - beta2,
                group["eps"], wd, 1 - lr * wd, lr, beta1]

    def _init_state(self, p: Tensor, state: dict, s: dict[str, bool]) -> bool:
        """Create missing state the way torch's ``_init_group`` does.

        Returns True when an SGD momentum buffer was created now (its first step).
        """
        if self.kind == "Adam":
            if len(state) == 0:
                # torch keeps a non-capturable step as a CPU float32 scalar tensor;
                # a captured (or Triton) update needs it on the device.
                state["step"] = torch.zeros((), dtype=torch.float32,
                                            device=p.device if self.step_on_device else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if s["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return False
        if not s["momentum_nonzero"]:
            return False
        if state.get("momentum_buffer") is None:
            # Placeholder; the graph overwrites it with the gradient (see fresh_buf).
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return True
        return False

    def prepare(self) -> tuple:
        """Collect state tensors and this step's scalars; call before :meth:`update`.

        Returns the pytree of tensors that :meth:`update` needs (pass it through
        the compiled function as an argument, never capture it).

        Runs once per optimizer step, next to a graph that may take ~100 µs on a tiny model, so
        the per-parameter loop is kept lean: constants per parameter are precomputed
        (``_plan``), the table row is computed once per (group, step), and the table is only
        rewritten when a row changed (SGD with a constant lr: never after the first step).
        """
        self._check_structure()
        groups = self.optimizer.param_groups
        states = self.optimizer.state
        adam = self.kind == "Adam"
        host_bias = not self.graph_bias_correction
        fresh: list[bool] = []
        per_param, row_keys = [], []
        for i, (p, gi, s) in enumerate(self._plan):
            if adam:
                st = states[p]
                if not st:
                    self._init_state(p, st, s)
                step_t = st["step"]
                if self.step_on_device and step_t.device != p.device:
                    # After load_state_dict of a CPU step: moved once (a tiny H2D copy), not per step.
                    step_t = st["step"] = step_t.to(device=p.device, dtype=torch.float32)
                entry = [step_t, st["exp_avg"], st["exp_avg_sq"]]
                if s["amsgrad"]:
                    entry.append(st["max_exp_avg_sq"])
                if not host_bias:
                    row_keys.append((gi, 1.0))
                elif step_t.is_cpu:  # torch's layout: read directly, no device sync
                    row_keys.append((gi, float(step_t) + 1))
                else:
                    row_keys.append((gi, self._next_host_step(i, step_t)))
            elif s["momentum_nonzero"]:
                # Reading optimizer.state (a defaultdict) would create an entry: SGD without
                # momentum keeps none, as torch's own step does.
                st = states[p]
                fresh.append(self._init_state(p, st, s))
                entry = [st["momentum_buffer"]]
                row_keys.append((gi, 0.0))
            else:
                fresh.append(False)
                entry = []
                row_keys.append((gi, 0.0))
            per_param.append(entry)
        self._write_rows(groups, row_keys)
        scalars = self._scalars_host
        if self._scalars_dev is not None:
            # Pageable host-to-device copy with non_blocking: CUDA stages the
            # host data immediately and does not synchronise the device.
            scalars = self._scalars_dev.copy_(scalars, non_blocking=True)
        if fresh and any(fresh):
            # Happens on the first step and after a state reload only. On a GPU
            # this is a small host-to-device copy (may synchronise); never per step.
            self.fresh_buf.logical_or_(torch.tensor(fresh, dtype=torch.bool).to(self.device))
        return per_param, scalars, self.fresh_buf

    def _write_rows(self, groups: list, row_keys: list) -> None:
        """Fill the scalar table: one row per (group, step) computed, written only if it changed.

        On CPU the previous graph call has finished (CPU execution is synchronous), so
        overwriting the table in place is safe; nothing else writes it.
        """
        cache: dict[tuple, list[float]] = {}
        rows = []
        for key in row_keys:
            row = cache.get(key)
            if row is None:
                gi, step = key
                group = groups[gi]
                row = cache[key] = self._adam_row(group, step) if self.kind == "Adam" else self._sgd_row(group)
            rows.append(row)
        if rows == self._last_rows:
            return
        if len(cache) == 1:
            self._scalars_np[:] = rows[0]  # one row for all parameters: broadcast
        else:
            self._scalars_np[...] = rows
        self._last_rows = rows

    @staticmethod
    def state_tensors(inputs: tuple) -> list[Tensor]:
        """Every tensor :meth:`update` writes besides the parameters (to restore a withheld step)."""
        per_param, _, fresh_buf = inputs
        return [t for entry in per_param for t in entry] + [fresh_buf]

    def _next_host_step(self, i: int, step_tensor: Tensor) -> float:
        """The step count this update will reach (+1: the graph increments the tensor).

        A CPU step (torch's non-capturable layout) is read directly: no device sync. A device
        step is read once per state tensor (after a load), then mirrored on the host.
        """
        if step_tensor.device.type == "cpu":
            return float(step_tensor) + 1
        cached = self._host_steps.get(i)
        if cached is None or cached[0] is not step_tensor:
            value = float(step_tensor)  # host sync: once after (re)loading optimizer state
        else:
            value = cached[1]
        self._host_steps[i] = (step_tensor, value + 1)
        return value + 1

    def finish(self) -> None:
        """Host bookkeeping after an update ran (keeps LR schedulers from warning)."""
        self.optimizer._opt_called = True  # what the scheduler's step wrapper records

    # --------------------------------------------------------------- graph side
    @torch.no_grad()
    def update(self, params: Sequence[Tensor], grads: Sequence[Tensor], inputs: tuple) -> None:
        """Apply one optimizer step in place. Pure tensor ops: safe in a fullgraph region."""
        per_param, scalars, fresh_buf = inputs
        graph_bias = self.graph_bias_correction
        for i, (p, g) in enumerate(zip(params, grads)):
            s = self.structure[self.group_index[i]]
            # Python-float scalars become the kernels' math type, as in torch:
            # the parameter dtype for fp32/fp64, float32 for fp16/bf16.
            opmath = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
            h = dict(zip(self.columns, scalars[i].to(opmath).unbind()))
            if self.use_triton:
                self._triton_one(p, g, per_param[i], h, s, fresh_buf[i])
            elif self.kind == "SGD":
                self._sgd_one(p, g, per_param[i], h, s, fresh_buf[i])
            else:
                self._adam_one(p, g, per_param[i], h, s, scalars[i] if graph_bias else None)
        if self.kind == "SGD":
            fresh_buf.zero_()  # each new buffer got its first step

    def _triton_one(self, p: Tensor, g: Tensor, state: list, h: dict, s: dict, fresh: Tensor) -> None:
        """One parameter through the fused Triton kernel (flat views; the op mutates them)."""
        ops = torch.ops.fastloop
        flat = p.view(-1)
        grad = g.reshape(-1).contiguous()
        if self.kind == "Adam":
            max_sq = state[3].view(-1) if s["amsgrad"] else None
            ops.fused_adam(flat, grad, state[1].view(-1), state[2].view(-1), max_sq, state[0],
                           h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"],
                           s["decoupled_weight_decay"], s["amsgrad"], s["maximize"])
            return
        buf = state[0].view(-1) if s["momentum_nonzero"] else None
        # torch.optim.SGD keeps no step; the kernel marks the first update by step == 1
        # (it adds 1 before reading), so feed it 0 for a fresh buffer, 1 otherwise.
        step_t = (~fresh).to(torch.float32)
        ops.fused_sgd(flat, grad, buf, step_t, h["lr"], h["momentum"], 1 - h["one_minus_dampening"],
                      h["weight_decay"], s["nesterov"], s["maximize"])

    @staticmethod
    def _sgd_one(p: Tensor, g: Tensor, state: list, h: dict, s: dict, fresh: Tensor) -> None:
        if s["maximize"]:
            g = -g
        g = g + p * h["weight_decay"]  # torch skips this when wd == 0; adding p * 0 is exact
        if s["momentum_nonzero"]:
            (buf,) = state
            momentum = h["momentum"]
            # First step: torch sets buf = grad.clone(); later: buf*m + (1-d)*grad.
            buf.copy_(torch.where(fresh, g, buf * momentum + g * h["one_minus_dampening"]))
            g = g + buf * momentum if s["nesterov"] else buf
        p.sub_(g * h["lr"])

    @staticmethod
    def _adam_one(p: Tensor, g: Tensor, state: list, h: dict, s: dict, row: Optional[Tensor] = None) -> None:
        step_t, exp_avg, exp_avg_sq = state[0], state[1], state[2]
        if s["maximize"]:
            g = -g
        step_t.add_(1)
        if row is not None:  # graph_bias_correction: from the device step, as torch does on the host
            cols = dict(zip(_ADAM_COLS, row.unbind()))  # float64
            step = step_t.to(torch.float64)
            opmath = h["lr"].dtype
            h = dict(h, step_size=(cols["lr"] / (1 - cols["beta1"] ** step)).to(opmath),
                     bias_correction2_sqrt=(1 - cols["beta2"] ** step).sqrt().to(opmath))
        if s["decoupled_weight_decay"]:
            p.mul_(h["decay_factor"])
        else:
            g = g + p * h["weight_decay"]
        exp_avg.lerp_(g, h["one_minus_beta1"])
        exp_avg_sq.mul_(h["beta2"]).add_(g * h["one_minus_beta2"] * g)
        if s["amsgrad"]:
            max_sq = state[3]
            max_sq.copy_(torch.maximum(max_sq, exp_avg_sq))
            denom = max_sq.sqrt() / h["bias_correction2_sqrt"] + h["eps"]
        else:
            denom = exp_avg_sq.sqrt() / h["bias_correction2_sqrt"] + h["eps"]
        p.sub_(h["step_size"] * exp_avg / denom)
