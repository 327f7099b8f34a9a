"""The bench's default run (workloads, plot) and the portable compile cache (issue 15, part 3)."""
import importlib.util
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
