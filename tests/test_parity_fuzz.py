"""scripts/parity_fuzz.py: random loop configurations agree between eager and compiled mode.

The default suite runs a fixed sample of 2 configurations and the 2 that found bugs from the seed-0
generator (together they cover one and two optimizers, frequencies, accumulation 1 and 4, both
clipping algorithms, both scheduler intervals, BatchNorm and Dropout: the smallest such sample,
to keep the suite's compile time down); ``pytest -m slow`` runs the first 50. Each
compiled configuration costs 10-50 s of compiling on a 2-core CPU.
"""
import copy
import importlib.util
import pathlib
import sys

import pytest
import torch

_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "parity_fuzz.py"
_spec = importlib.util.spec_from_file_location("parity_fuzz", _SCRIPT)
parity_fuzz = importlib.util.module_from_spec(_spec)
sys.modules["parity_fuzz"] = parity_fuzz  # dataclasses look their module up there
_spec.loader.exec_module(parity_fuzz)

SEED = 0
DEFAULT_SAMPLE = (1, 3)
CONFIGS = parity_fuzz.generate(50, SEED)


# Configurations that found bugs, kept as regular tests once fixed:
# #10 (two Adams with frequencies [1, 1] and accumulate=2): the fused step restarted an optimizer's
#     accumulation window after each of its steps, eager only on a window-start batch_idx;
# #5 (SGD momentum=0): the fused update created an empty optimizer.state entry per parameter.
REGRESSIONS = (5, 10)


def gradients_carry_over(config):
    """Whether an optimizer with a ``frequency`` steps on gradients carried over from its last
    step: eager clears them only on a batch that starts an accumulation window
    (``batch_idx % accumulate == 0``, as Lightning 1.9 does)."""
    if not config.frequencies or config.accumulate == 1:
        return False
    batches = -(-config.samples // config.batch_size)
    cycle = sum(config.frequencies)
    stale = {}  # optimizer -> eager's gradients still hold what its last step used
    for _ in range(config.max_epochs):
        for batch_idx in range(batches):
            position, opt = batch_idx % cycle, 0
            while position >= config.frequencies[opt]:
                position, opt = position - config.frequencies[opt], opt + 1
            if batch_idx % config.accumulate == 0:
                stale[opt] = False
            if (batch_idx + 1) % config.accumulate == 0 or batch_idx == batches - 1:
                if stale.get(opt):
                    return True
                stale[opt] = True
    return False


def sgd_without_momentum(config):
    return any(spec.kind == "sgd" and not dict(spec.kwargs)["momentum"] for spec in config.optimizers)


def _assert_agree(config):
    outcome = parity_fuzz.run_config(config)
    assert outcome.used == "compiled", f"the fused step did not serve: {config.describe()}"
    assert outcome.diffs == [], f"{config.describe()}: " + "; ".join(outcome.diffs)


@pytest.mark.compile
@pytest.mark.usefixtures("no_mode_override")
@pytest.mark.parametrize("index", DEFAULT_SAMPLE + REGRESSIONS)
def test_sampled_configuration_agrees(index):
    _assert_agree(CONFIGS[index])


@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.usefixtures("no_mode_override")
@pytest.mark.parametrize("index", [c.index for c in CONFIGS])
def test_fifty_configurations_agree(index):
    _assert_agree(CONFIGS[index])


def test_default_sample_covers_the_features():
    sample = [CONFIGS[i] for i in DEFAULT_SAMPLE + REGRESSIONS]
    assert {len(c.optimizers) for c in sample} == {1, 2}
    assert any(c.frequencies for c in sample)
    assert {c.clip[0] for c in sample if c.clip} == {"norm", "value"}
    assert {c.scheduler[3] for c in sample if c.scheduler} == {"step", "epoch"}
    assert {c.layer for c in sample} == {"batchnorm", "dropout", "none"}
    assert min(c.accumulate for c in sample) == 1 and max(c.accumulate for c in sample) == 4
    assert any(c.val_check_interval < 1 for c in sample) and any(c.val_check_interval == 1 for c in sample)


def test_regressions_hold_the_bugs_they_found():
    assert gradients_carry_over(CONFIGS[10]) and not sgd_without_momentum(CONFIGS[10])
    assert sgd_without_momentum(CONFIGS[5])


def test_generator_is_seeded_and_valid():
    assert parity_fuzz.generate(30, 5) == parity_fuzz.generate(30, 5)
    assert parity_fuzz.generate(30, 5) != parity_fuzz.generate(30, 6)
    for config in parity_fuzz.generate(200, SEED):
        assert config.samples % config.batch_size != 0, config.describe()  # a partial last batch
        if config.layer == "batchnorm":  # BatchNorm cannot train on one sample
            assert config.samples % config.batch_size >= 2, config.describe()
        assert 1 <= config.accumulate <= 4
        for spec in config.optimizers:
            kwargs = dict(spec.kwargs)
            if kwargs.get("nesterov"):
                assert kwargs["momentum"] > 0, config.describe()
            spec.build([torch.nn.Parameter(torch.zeros(1))])  # torch accepts the arguments


def test_compare_reports_what_differs():
    """The comparison is not vacuous: a perturbed parameter, counter or metric is reported."""
    config = CONFIGS[10]  # two optimizers
    model_a = parity_fuzz.build_model(config)
    model_b = copy.deepcopy(model_a)
    a = parity_fuzz.fit(model_a, config, "eager")
    b = parity_fuzz.fit(model_b, config, "eager")
    assert parity_fuzz.compare(model_a, a, model_b, b) == []
    with torch.no_grad():
        model_b.discriminator[0].weight[0, 0] += 1e-3
    b.callback_metrics["val_loss"] = b.callback_metrics["val_loss"] + 1
    diffs = parity_fuzz.compare(model_a, a, model_b, b)
    assert len(diffs) == 2, diffs
    assert diffs[0].startswith("discriminator.0.weight: max abs diff 0.001")
    assert diffs[1].startswith("metric val_loss: max abs diff 1 ")
