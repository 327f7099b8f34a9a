"""``ModelSummary``: the table of a module's layers and parameter counts printed at fit start.

The layout is Lightning 1.x's::

      | Name | Type       | Params
    ------------------------------------
    0 | net  | Sequential | 2.8 K
    ------------------------------------
    2.8 K     Trainable params
    0         Non-trainable params
    2.8 K     Total params
    0.011     Total estimated model params size (MB)

Lightning adds "In sizes"/"Out sizes" columns when the module has an ``example_input_array``,
by running a forward pass with hooks on every layer. They are left out here: fit start stays
cheap and runs none of the user's code.

The size is the parameters' actual bytes (``numel * element_size``), which equals Lightning's
figure for float32 parameters. Lazy (uninitialized) parameters count 0, as in Lightning.
"""
from __future__ import annotations

from typing import Any, Iterable, List, Sequence, Tuple

from torch import nn

from fastloop.callback import Callback

_COUNT_UNITS = (" ", "K", "M", "B", "T")


def _numel(param: nn.Parameter) -> int:
    return 0 if isinstance(param, nn.parameter.UninitializedParameter) else param.numel()


def human_count(number: int) -> str:
    """A parameter count with a unit: ``123  ``, ``1.2 K``, ``2.0 M``, ``400 T``, ``5,000 T``."""
    if number < 0:
        raise ValueError(f"human_count needs a count >= 0, got {number}")
    groups = min((len(str(int(number))) + 2) // 3, len(_COUNT_UNITS))  # 3-digit groups, at most up to T
    scaled = number * 10 ** (-3 * (groups - 1))
    unit = _COUNT_UNITS[groups - 1]
    if groups == 1 or scaled >= 100:
        return f"{int(scaled):,d} {unit}"
    return f"{scaled:,.1f} {unit}"


def summarized_layers(module: nn.Module, max_depth: int = 1) -> List[Tuple[str, nn.Module]]:
    """The ``(name, layer)`` rows of the table: children for depth 1, every sub-module for -1,
    sub-modules nested at most ``max_depth`` deep otherwise, none for 0."""
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < -1:
        raise ValueError(f"max_depth must be -1 (all levels), 0 (no summary) or > 0, got {max_depth!r}")
    if max_depth == 0:
        return []
    if max_depth == 1:
        return list(module.named_children())
    layers = list(module.named_modules())[1:]  # not the module itself
    return [(name, layer) for name, layer in layers if max_depth == -1 or name.count(".") < max_depth]


def _table(columns: Sequence[Tuple[str, Sequence[str]]]) -> List[str]:
    widths = [max([len(header)] + [len(cell) for cell in cells]) for header, cells in columns]
    divider = "-" * (sum(widths) + 3 * (len(columns) + 1))
    rows = [[header for header, _ in columns]] + [list(row) for row in zip(*(cells for _, cells in columns))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return [lines[0], divider, *lines[1:], divider]


def summarize(module: nn.Module, max_depth: int = 1) -> str:
    """The summary table of ``module`` (see the module docstring), without a trailing newline."""
    layers = summarized_layers(module, max_depth)
    columns = [
        (" ", [str(i) for i in range(len(layers))]),
        ("Name", [name for name, _ in layers]),
        ("Type", [type(layer).__name__ for _, layer in layers]),
        ("Params", [human_count(sum(_numel(p) for p in layer.parameters())) for _, layer in layers]),
    ]
    params: Iterable[nn.Parameter] = list(module.parameters())
    total = sum(_numel(p) for p in params)
    trainable = sum(_numel(p) for p in params if p.requires_grad)
    megabytes = sum(_numel(p) * p.element_size() for p in params if _numel(p)) * 1e-6
    totals = [
        (human_count(trainable), "Trainable params"),
        (human_count(total - trainable), "Non-trainable params"),
        (human_count(total), "Total params"),
        (f"{megabytes:,.3f}", "Total estimated model params size (MB)"),
    ]
    return "\n".join(_table(columns) + [value.ljust(10) + label for value, label in totals])


class ModelSummary(Callback):
    """Prints ``summarize(module, max_depth)`` at fit start, on the global-zero process only.

    Args:
        max_depth: how deep nested layers are listed: 1 top-level modules, -1 all, 0 no summary.
    """

    def __init__(self, max_depth: int = 1) -> None:
        summarized_layers(nn.Module(), max_depth)  # validates max_depth now, not at fit start
        self._max_depth = max_depth

    @property
    def max_depth(self) -> int:
        return self._max_depth

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self._max_depth == 0 or not getattr(trainer, "is_global_zero", True):
            return
        print(summarize(pl_module, self._max_depth))


__all__ = ["ModelSummary", "human_count", "summarize", "summarized_layers"]
