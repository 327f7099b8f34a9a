"""The bench's default run (workloads, plot) and the portable compile cache (issue 15, part 3)."""
import importlib.util
import inspect
import io
import os
import sys

import pytest
import torch

from fastloop.bench import report
from fastloop.bench.__main__ import DEFAULT_PLOT, build_parser, main, plot_path
from fastloop.step.compile_cache import compile_cache, load_compile_cache, save_compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TINY_RUN = ["--device", "cpu", "--contenders", "raw,fastloop-eager", "--workloads", "tiny-mlp",
            "--steps", "2", "--rounds", "1", "--warmup", "1"]


def test_default_run_covers_the_tiny_mlp_and_a_larger_model():
    args = build_parser().parse_args([])
    assert args.workloads == ["tiny-mlp", "small-transformer"]
    assert args.plot is None and args.no_plot is False


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_default_run_writes_the_png_plot(tmp_path):
    assert main(TINY_RUN) == 0
    with open(tmp_path / DEFAULT_PLOT, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_PLOT]  # no temporary file left behind


def test_no_plot_writes_nothing(tmp_path):
    assert main(TINY_RUN + ["--no-plot"]) == 0
    assert list(tmp_path.iterdir()) == []


def test_plot_path_follows_the_options_and_matplotlib(monkeypatch):
    parse = build_parser().parse_args
    monkeypatch.setattr(report, "matplotlib_available", lambda: True)
    assert plot_path(parse([])) == DEFAULT_PLOT
    assert plot_path(parse(["--plot", "x.png"])) == "x.png"
    assert plot_path(parse(["--no-plot"])) is None
    monkeypatch.setattr(report, "matplotlib_available", lambda: False)
    assert plot_path(parse([])) is None  # no matplotlib: the default run skips the plot quietly
    assert plot_path(parse(["--plot", "x.png"])) == "x.png"  # asked for: report.plot says why not
    with pytest.raises(SystemExit):
        parse(["--plot", "x.png", "--no-plot"])


def test_plot_without_matplotlib_says_so(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    assert report.plot([], str(tmp_path / "p.png")) == \
        "--plot needs matplotlib (pip install matplotlib); no plot written"
    assert list(tmp_path.iterdir()) == []


def test_compile_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    def affine(x):
        return x * 3.0 + 1.0

    x = torch.arange(4.0)
    assert torch.equal(torch.compile(affine, backend="inductor", fullgraph=True)(x), affine(x))
    path = tmp_path / "step.compile-cache"
    saved = save_compile_cache(path)
    assert saved >= 1 and path.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step.")] == ["step.compile-cache"]
    assert load_compile_cache(path) == saved  # (with whatever earlier tests of this process compiled)
    with compile_cache(path):  # loads, then writes again what was loaded: the file stays complete
        pass
    assert load_compile_cache(path) == saved


def test_load_of_a_foreign_file_names_it(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_bytes(b"not a cache")
    with pytest.raises(ValueError, match=r"'.*notes\.txt' is not a compile cache written by save_compile_cache"):
        load_compile_cache(junk)


# --- a saved (aot-compiled) step must not be served to a changed step (benchmarks/aot_identity_guards.py,
# the check an opt-in warm start without Dynamo would need; not wired into fastloop yet)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
def _step_with(act, scale):
    def step(x):
        return act(x) * scale
    return step


def _locals_of(fn, *args):
    """What Dynamo's guards read for a call of ``fn``: its closure variables and arguments."""
    names = {n: c.cell_contents for n, c in zip(fn.__code__.co_freevars, fn.__closure__ or ())}
    names.update(inspect.signature(fn).bind(*args).arguments)
    return names


def test_describe_tells_functions_apart_by_name_and_code():
    from aot_identity_guards import describe

    assert describe(_step_with) == describe(_step_with)
    assert describe(torch.tanh) != describe(torch.relu)
    assert describe(_step_with(torch.tanh, 1.0)) == describe(_step_with(torch.relu, 2.0))  # same code
    assert describe(_locals_of)[0] == "function" and describe(_locals_of) != describe(_step_with)
    assert describe(torch.nn.Linear) == ("class", "torch.nn.modules.linear", "Linear")
    assert describe(3) == ("constant", "3") and describe(object())[0] == "object"


def test_saved_step_identity_and_dynamo_guards_reject_a_changed_closure():
    """torch drops identity guards when it saves a step, and the loaded function checks its
    guards on its own saved closure: a step for ``relu`` (or another scale) would run the saved
    ``tanh`` step. IdentityGuards plus Dynamo's guards evaluated on the new closure catch both."""
    from torch._guards import TracingContext, tracing

    from aot_identity_guards import IdentityGuards

    x = torch.randn(3)
    saved_step = _step_with(torch.tanh, 2.0)
    identity = IdentityGuards()
    compiled = torch.compile(saved_step, backend="aot_eager", fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": identity.filter})
    data = type(aot := compiled.aot_compile(((x,), {}))).serialize(aot).serialized_data
    with tracing(TracingContext(None)):  # unpickling the guards installs one (torch 2.13)
        loaded = torch.compiler.load_compiled_function(io.BytesIO(data))
    identity = IdentityGuards(identity.entries)  # as read back from a file
    guards = loaded._artifacts.guard_manager

    same = _step_with(torch.tanh, 2.0)
    assert identity.check(_locals_of(same, x), same.__globals__) == ""
    assert guards.check(_locals_of(same, x))
    torch.testing.assert_close(loaded(x), same(x))

    relu = _step_with(torch.relu, 2.0)
    assert "relu" in identity.check(_locals_of(relu, x), relu.__globals__)
    assert not torch.equal(loaded(x), relu(x))  # what would run without the check

    rescaled = _step_with(torch.tanh, 3.0)
    assert identity.check(_locals_of(rescaled, x), rescaled.__globals__) == ""
    assert not guards.check(_locals_of(rescaled, x))
    assert loaded.guard_check(x)  # torch's own check reads the saved closure: it passes


def test_identity_guards_read_the_names_dynamo_installs_while_tracing():
    """A process that only loaded a step lacks the builtins dict and the module aliases Dynamo put
    in the step's globals while tracing; the check finds them itself, and rejects what differs."""
    import torch.utils._pytree as pytree

    from aot_identity_guards import IdentityGuards, describe

    entries = [("G['__import_torch_dot_utils_dot__pytree']", describe(pytree)),
               ("G['__builtins_dict___0']['int']", describe(int)), ("L['n']", describe(2))]
    assert IdentityGuards(entries).check({"n": 2}, {}) == ""
    assert IdentityGuards(entries).check({"n": 3}, {}) == "L['n'] is ('constant', '3'), was ('constant', '2')"
    assert "KeyError" in IdentityGuards([("G['__no_such_alias']", describe(pytree))]).check({}, {})


def test_the_bench_transformers_compile_with_the_cpp_wrapper():
    """One C++ translation unit instead of one per kernel: -21 % cold CPU seconds on
    small-transformer (benchmarks/RESULTS.md), up to lm-depth-8's 418560 parameters."""
    from fastloop.bench.models import TinyTransformerLM
    from fastloop.step.cpu_inductor import cpu_step_options

    for layers in (2, 8):
        assert cpu_step_options(TinyTransformerLM(layers=layers), torch.device("cpu"))["cpp_wrapper"] is True
