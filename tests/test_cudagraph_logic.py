"""Host-side logic of the CUDA-graph step, on CPU.

The planner, signatures and static buffers are tested directly. The step itself runs inside
a real ``Trainer.fit`` with a fake graph backend: "capture" records the function and its
static arguments, "replay" calls it again and writes the results into the *same* output
tensors (as a CUDA graph does). So a batch not copied into the static buffers, a stale
flag or a logged loss that is not cloned shows up as a difference from the eager run.
The fused step runs uncompiled here (compile_fullgraph patched to the identity) to keep
the tests fast; the compiled path is covered by tests/test_step_fused.py.
"""
import copy

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import fastloop.step.cudagraph as cg
import fastloop.step.fused_step as fused_step_mod
from fastloop import Callback, Trainer
from fastloop.config import CompileConfig
from fastloop.step.cudagraph_plan import (
    CAPTURE, COMPILED, REPLAY, WARMUP, CapturePlanner, NotCapturable, StaticBatch, batch_signature,
    check_batch_device, persistent_key,
)
from fastloop.testing import BoringModel, random_loader

# The suite pins FASTLOOP_MODE=eager; these tests choose their modes themselves.
pytestmark = pytest.mark.usefixtures("no_mode_override")


# ------------------------------------------------------------------ pure pieces
def test_planner_warms_up_then_captures_then_replays():
    plan = CapturePlanner(max_signatures=2, warmup_steps=2)
    key = (0, True, "sig-a")
    assert [plan.action(key)[0] for _ in range(3)] == [WARMUP, WARMUP, CAPTURE]
    plan.mark_captured(key)
    assert plan.action(key) == (REPLAY, False)
    # the accumulating call of the same signature is its own graph, with its own warm-up
    assert plan.action((0, False, "sig-a"))[0] == WARMUP


def test_planner_warms_up_at_least_once():
    plan = CapturePlanner(max_signatures=1, warmup_steps=0)
    assert plan.action((0, True, "s"))[0] == WARMUP  # the first call compiles: never during capture
    assert plan.action((0, True, "s"))[0] == CAPTURE


def test_planner_bounds_signatures_and_flags_each_rejection_once():
    plan = CapturePlanner(max_signatures=2, warmup_steps=1)
    plan.action((0, True, "a"))
    plan.action((0, True, "b"))
    assert plan.action((0, True, "c")) == (COMPILED, True)
    assert plan.action((0, True, "c")) == (COMPILED, False)
    assert plan.action((0, False, "c")) == (COMPILED, False)
    assert plan.admitted == ["a", "b"]


def test_planner_invalidate_is_bounded():
    plan = CapturePlanner(max_signatures=1, warmup_steps=1, max_recaptures=2)
    plan.mark_captured((0, True, "a"))
    plan.mark_captured((1, True, "a"))
    assert plan.invalidate(0)
    assert plan.captured == {(1, True, "a")}
    assert plan.invalidate(0)
    assert not plan.invalidate(0)
    assert plan.disabled is not None and plan.action((1, True, "a"))[0] == COMPILED


def test_batch_signature_tracks_shapes_dtypes_and_constants():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    assert batch_signature((x, y)) == batch_signature((torch.ones(4, 3), torch.ones(4, dtype=torch.long)))
    assert batch_signature((x, y)) != batch_signature((x[:2], y[:2]))
    assert batch_signature((x, y)) != batch_signature((x.double(), y))
    assert batch_signature((x, y)) != batch_signature([x, y])
    assert batch_signature({"x": x, "k": 1}) != batch_signature({"x": x, "k": 2})
    assert batch_signature((x.t(),)) != batch_signature((x.t().contiguous(),))


def test_batch_signature_rejects_unhashable_leaves():
    class Box:
        __hash__ = None

    with pytest.raises(NotCapturable, match="unhashable"):
        batch_signature((torch.zeros(1), Box()))


def test_check_batch_device():
    check_batch_device((torch.zeros(1), 3), "cpu")
    with pytest.raises(NotCapturable, match="not cuda"):
        check_batch_device((torch.zeros(1),), "cuda")


def test_static_batch_refills_the_same_tensors():
    first = (torch.randn(4, 3), {"y": torch.arange(4), "tag": "a"})
    static = StaticBatch(first)
    out1 = static.load(first)
    ptrs = [t.data_ptr() for t in tree_flatten(out1)[0] if isinstance(t, torch.Tensor)]
    second = (torch.randn(4, 3), {"y": torch.arange(4) + 10, "tag": "a"})
    out2 = static.load(second)
    assert out2 is out1
    assert [t.data_ptr() for t in tree_flatten(out2)[0] if isinstance(t, torch.Tensor)] == ptrs
    assert torch.equal(out2[0], second[0]) and torch.equal(out2[1]["y"], second[1]["y"])
    assert out2[1]["tag"] == "a"


def test_persistent_key_sees_replaced_tensors_only():
    a, b = torch.zeros(3), torch.zeros(2)
    key = persistent_key(({"w": a}, [b], ()))
    a.add_(1)  # in-place: same address
    assert persistent_key(({"w": a}, [b], ())) == key
    assert persistent_key(({"w": a.clone()}, [b], ())) != key


# ------------------------------------------------------------------ the step, with a fake backend
class FakeGraph:
    """Replays by calling the recorded function on the arguments bound at capture, writing the
    results into the same output tensors every time (what a CUDA graph does)."""

    def __init__(self, fn):
        self.fn = fn
        self.outputs = None

    def replay(self):
        out = self.fn()
        if self.outputs is None:
            self.outputs = out
            return
        for static, new in zip(tree_flatten(self.outputs)[0], tree_flatten(out)[0]):
            if isinstance(static, torch.Tensor):
                static.copy_(new)


class FakeBackend:
    def __init__(self, fail_capture=False):
        self.device = torch.device("cpu")
        self.warmups = 0
        self.captures = 0
        self.fail_capture = fail_capture

    def warmup(self, fn):
        self.warmups += 1
        return fn()

    def capture(self, fn):
        if self.fail_capture:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        return FakeGraph(fn)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Route mode='cudagraph' on CPU through the real builder with a fake backend."""
    backends = []

    def make_backend(device, fail=False):
        backends.append(FakeBackend(fail))
        return backends[-1]

    monkeypatch.setattr(cg, "cudagraph_blockers", lambda trainer, fused: [])
    monkeypatch.setattr(cg, "_cuda_ready", lambda: True)
    monkeypatch.setattr(cg, "CudaGraphBackend", make_backend)
    monkeypatch.setattr(fused_step_mod, "compile_fullgraph", lambda fn, backend: fn)
    return backends


class KeepLosses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"])  # kept by reference, compared at the end


def run(mode, model, loader, **kwargs):
    keep = KeepLosses()
    compile_config = kwargs.pop("compile_config", CompileConfig(cudagraph_warmup_steps=2))
    trainer = Trainer(mode=mode, accelerator="cpu", enable_progress_bar=False, num_sanity_val_steps=0,
                      callbacks=[keep], compile_config=compile_config, **kwargs)
    trainer.fit(model, loader)
    return trainer, keep.losses


def assert_close_params(a: nn.Module, b: nn.Module, atol=1e-5):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=atol, msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("accumulate,clip", [(1, None), (2, 0.5)])
def test_cudagraph_step_matches_eager(fake_cuda, optimizer, accumulate, clip):
    model = BoringModel(optimizer=optimizer, lr=0.05)
    reference = copy.deepcopy(model)
    loader = random_loader(n=96, batch_size=16)
    kwargs = dict(max_epochs=3, accumulate_grad_batches=accumulate, gradient_clip_val=clip)
    trainer, losses = run("cudagraph", model, loader, **kwargs)
    _, eager_losses = run("eager", reference, loader, **kwargs)
    step = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.train_step
    assert isinstance(step, cg.CudaGraphTrainStep)
    assert trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.step_report.used == "cudagraph"
    assert step.captured_graphs == (1 if accumulate == 1 else 2)
    assert fake_cuda[0].captures == step.captured_graphs
    assert_close_params(model, reference)
    # every kept loss is its own value, not the buffer the next replay overwrote
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager_losses), rtol=1e-5, atol=1e-6)
    assert len(set(float(v) for v in losses)) > len(losses) // 2


def test_smaller_last_batch_captures_a_second_graph_and_no_more(fake_cuda):
    model = BoringModel(optimizer="adam", lr=0.01)
    reference = copy.deepcopy(model)
    loader = random_loader(n=70, batch_size=16)  # 4 x 16, then 6
    trainer, _ = run("cudagraph", model, loader, max_epochs=4,
                     compile_config=CompileConfig(cudagraph_warmup_steps=2, max_graphs_per_step=2))
    run("eager", reference, loader, max_epochs=4)
    step = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.train_step
    assert step.captured_graphs == 2  # the 6-row batch: warmed up in epochs 1-2, captured in 3
    assert step.planner.admitted and len(step.planner.admitted) == 2
    assert_close_params(model, reference)


def test_shapes_past_the_bound_run_compiled_with_a_warning(fake_cuda):
    model = BoringModel(optimizer="sgd")
    reference = copy.deepcopy(model)
    loader = random_loader(n=70, batch_size=16)
    with pytest.warns(RuntimeWarning, match="max_graphs_per_step=1"):
        trainer, _ = run("cudagraph", model, loader, max_epochs=3,
                         compile_config=CompileConfig(cudagraph_warmup_steps=1, max_graphs_per_step=1))
    run("eager", reference, loader, max_epochs=3)
    loop = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop
    assert loop.train_step.captured_graphs == 1
    assert sum("max_graphs_per_step" in r for r in loop.step_report.reasons) == 1  # warned once
    assert_close_params(model, reference)


def test_capture_failure_falls_back_to_compiled_with_a_reason(fake_cuda, monkeypatch):
    monkeypatch.setattr(cg, "CudaGraphBackend", lambda device: FakeBackend(fail_capture=True))
    model = BoringModel(optimizer="adam")
    reference = copy.deepcopy(model)
    loader = random_loader(n=64, batch_size=16)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        trainer, _ = run("cudagraph", model, loader, max_epochs=2)
    run("eager", reference, loader, max_epochs=2)
    loop = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop
    assert loop.step_report.used == "compiled"
    assert any("capture failed" in r for r in loop.step_report.reasons)
    assert "capture failed" in trainer.explain()
    assert_close_params(model, reference)


class ResetGradsToNone(Callback):
    """Replaces the gradient tensors the captured graph reads, once, mid-run."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == 6:
            for p in module.parameters():
                p.grad = None


def test_replaced_persistent_inputs_are_captured_again(fake_cuda):
    model = BoringModel(optimizer="adam", lr=0.01)
    reference = copy.deepcopy(model)
    loader = random_loader(n=64, batch_size=16)
    keep = ResetGradsToNone()
    trainer = Trainer(mode="cudagraph", accelerator="cpu", enable_progress_bar=False, num_sanity_val_steps=0,
                      callbacks=[keep], max_epochs=3, compile_config=CompileConfig(cudagraph_warmup_steps=1))
    trainer.fit(model, loader)
    run("eager", reference, loader, max_epochs=3)
    step = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.train_step
    assert step.planner.recaptures == 1
    assert fake_cuda[0].captures == 2
    assert_close_params(model, reference)


def test_builder_refuses_a_cpu_run():
    trainer = Trainer(mode="cudagraph", accelerator="cpu", enable_progress_bar=False)
    assert cg.cudagraph_blockers(trainer, {0: object()}) == [
        "CUDA graphs need a CUDA device; this run is on cpu"]


@pytest.mark.compile
def test_compiled_core_is_not_recompiled_after_warm_up(monkeypatch):
    """Capture must never compile: the static arguments used at capture and replay must hit the
    graph compiled during warm-up (one graph for one signature and no accumulation)."""
    monkeypatch.setattr(cg, "cudagraph_blockers", lambda trainer, fused: [])
    monkeypatch.setattr(cg, "_cuda_ready", lambda: True)
    monkeypatch.setattr(cg, "CudaGraphBackend", lambda device: FakeBackend())
    model = BoringModel(optimizer="adam", lr=0.01)
    reference = copy.deepcopy(model)
    loader = random_loader(n=64, batch_size=16)
    trainer, _ = run("cudagraph", model, loader, max_epochs=2)
    run("eager", reference, loader, max_epochs=2)
    step = trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop.train_step
    assert step.captured_graphs == 1 and step.graph_count == 1
    assert_close_params(model, reference, atol=1e-5)
