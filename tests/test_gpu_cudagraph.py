"""The CUDA-graph step on a GPU (skipped without CUDA; written without access to one).

Tolerances: the eager reference runs op by op (cuBLAS matmuls, ATen pointwise kernels); the
captured step runs inductor's fused Triton kernels, which reorder and fuse the pointwise math
(and the Triton optimizer kernels compute Adam's bias corrections in fp32, torch in float64).
Each step therefore differs by a few ulp; Adam's normalised update carries such differences
forward rather than damping them, so after 100 steps of lr 1e-2 parameters are compared at
rtol 1e-3 / atol 1e-4 (about 10x the drift we measured between compiled and eager on CPU
over 30 steps, scaled to 100). fp32 matmuls use full precision (no TF32) in both runs.
"""
import copy

import pytest
import torch

from fastloop import Callback, Trainer
from fastloop.config import CompileConfig
from fastloop.testing import BoringModel, random_loader

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("no_mode_override")]


class MomentumModel(BoringModel):
    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class KeepLosses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"])  # by reference: a replay must not overwrite it


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def fit(mode, model, loader, compile_config=None, **kwargs):
    keep = KeepLosses()
    trainer = Trainer(mode=mode, accelerator="cuda", enable_progress_bar=False, num_sanity_val_steps=0,
                      limit_val_batches=0, callbacks=[keep], compile_config=compile_config or CompileConfig(),
                      **kwargs)
    trainer.fit(model, loader)
    torch.cuda.synchronize()
    return trainer, keep.losses


def opt_loop(trainer):
    return trainer.fit_loop.epoch_loop.batch_loop.optimizer_loop


def assert_params_close(a, b, rtol=1e-3, atol=1e-4):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("accumulate,clip", [(1, None), (2, 0.5)])
@pytest.mark.parametrize("triton_kernels", [False, True])
def test_cudagraph_matches_eager_over_100_steps(optimizer, accumulate, clip, triton_kernels):
    torch.manual_seed(0)
    model = MomentumModel(optimizer=optimizer, lr=0.01)
    reference = copy.deepcopy(model)
    loader = random_loader(n=16 * 100 * accumulate, batch_size=16)
    kwargs = dict(max_epochs=1, accumulate_grad_batches=accumulate, gradient_clip_val=clip)
    trainer, losses = fit("cudagraph", model, loader, CompileConfig(triton_kernels=triton_kernels), **kwargs)
    _, eager_losses = fit("eager", reference, loader, **kwargs)
    loop = opt_loop(trainer)
    assert loop.step_report.used == "cudagraph", trainer.explain()
    assert trainer.global_step == 100
    assert loop.train_step.captured_graphs == (1 if accumulate == 1 else 2)
    assert_params_close(model, reference)
    torch.testing.assert_close(torch.stack(losses), torch.stack(eager_losses), rtol=1e-3, atol=1e-4)


def test_smaller_last_batch_captures_a_second_graph_and_no_more():
    model = MomentumModel(optimizer="adam", lr=0.01)
    reference = copy.deepcopy(model)
    loader = random_loader(n=70, batch_size=16)  # 4 x 16 + 6
    config = CompileConfig(cudagraph_warmup_steps=2, max_graphs_per_step=2)
    trainer, _ = fit("cudagraph", model, loader, config, max_epochs=5)
    fit("eager", reference, loader, max_epochs=5)
    step = opt_loop(trainer).train_step
    assert step.captured_graphs == 2
    assert len(step.planner.admitted) == 2 and not step.planner.rejected
    assert_params_close(model, reference)


def test_a_shape_past_the_bound_runs_compiled_with_a_warning():
    model = MomentumModel(optimizer="sgd", lr=0.05)
    loader = random_loader(n=70, batch_size=16)
    with pytest.warns(RuntimeWarning, match="max_graphs_per_step=1"):
        trainer, losses = fit("cudagraph", model, loader,
                              CompileConfig(cudagraph_warmup_steps=1, max_graphs_per_step=1), max_epochs=3)
    assert opt_loop(trainer).train_step.captured_graphs == 1
    assert torch.isfinite(torch.stack(losses)).all()


def test_kept_losses_are_not_overwritten_by_later_replays():
    model = MomentumModel(optimizer="adam", lr=0.01)
    reference = copy.deepcopy(model)
    loader = random_loader(n=16 * 20, batch_size=16)
    _, losses = fit("cudagraph", model, loader, max_epochs=1)
    _, eager_losses = fit("eager", reference, loader, max_epochs=1)
    values = torch.stack(losses).cpu()
    assert len(set(values.tolist())) == len(values)  # distinct: none aliases the static output
    torch.testing.assert_close(values, torch.stack(eager_losses).cpu(), rtol=1e-3, atol=1e-4)
    assert len({t.data_ptr() for t in losses}) == len(losses)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_runs_finish_finite_and_close_to_eager(precision):
    model = MomentumModel(optimizer="adam", lr=0.01)
    reference = copy.deepcopy(model)
    loader = random_loader(n=16 * 50, batch_size=16)
    trainer, losses = fit("cudagraph", model, loader, precision=precision, max_epochs=1)
    _, eager_losses = fit("eager", reference, loader, precision=precision, max_epochs=1)
    assert opt_loop(trainer).step_report.used == "cudagraph", trainer.explain()
    losses, eager_losses = torch.stack(losses).float(), torch.stack(eager_losses).float()
    assert torch.isfinite(losses).all()
    # bf16 has 8 mantissa bits: compare losses loosely, and their trend tightly enough to catch a broken update
    torch.testing.assert_close(losses, eager_losses, rtol=5e-2, atol=5e-2)
    assert losses[-10:].mean() < losses[:10].mean()
    assert_params_close(model, reference, rtol=5e-2, atol=5e-3)


def test_adam_step_lives_on_the_device_and_checkpoints_load_in_eager(tmp_path):
    model = MomentumModel(optimizer="adam", lr=0.01)
    loader = random_loader(n=64, batch_size=16)
    trainer, _ = fit("cudagraph", model, loader, max_epochs=2)
    opt = trainer.optimizers[0]
    assert all(opt.state[p]["step"].device.type == "cuda" for p in model.parameters())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(str(path))
    resumed = MomentumModel(optimizer="adam", lr=0.01)
    trainer2 = Trainer(mode="eager", accelerator="cuda", enable_progress_bar=False, num_sanity_val_steps=0,
                       max_epochs=3)
    trainer2.fit(resumed, loader, ckpt_path=str(path))
    assert trainer2.global_step == 12


def test_device_copier_delivers_equal_batches_on_the_compute_stream():
    from fastloop.data.device_copy import DeviceCopier
    from fastloop.data.fetcher import DataFetcher

    host = [(torch.randn(8, 4), torch.arange(8)) for _ in range(5)]
    pinned = [tuple(t.pin_memory() for t in b) for b in host]
    for batches in (host, pinned):
        fetcher = DataFetcher(batches, copier=DeviceCopier(torch.device("cuda"))).start()
        got = [tuple(t * 1 for t in b) for b in fetcher]  # consumed on the current stream
        torch.cuda.synchronize()
        for (x, y), (gx, gy) in zip(host, got):
            assert gx.is_cuda and torch.equal(gx.cpu(), x) and torch.equal(gy.cpu(), y)
