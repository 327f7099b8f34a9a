"""``TQDMProgressBar`` (alias ``ProgressBar``): Lightning 1.x's progress bars on ``tqdm``.

Bars, as in Lightning 1.9: a main bar per training epoch ("Epoch N", train batches plus the
validation batches run inside the epoch), a validation bar, a sanity-check bar, and test and
predict bars, each labelled "<stage> DataLoader <i>". The main bar's postfix is
``get_metrics()``: ``loss`` (mean of the last 20 training losses, Lightning's running-loss
window, times ``accumulate_grad_batches`` so it is the loss ``training_step`` returned),
``v_num`` (logger version) and ``trainer.progress_bar_metrics``.

On a terminal the bars redraw every ``refresh_rate`` batches. On any other stream (CI logs, a
file) nothing is redrawn: each bar writes one finished line per epoch, validation, test or
predict run, e.g. ``Epoch 3: 100%| 32/32 [00:01, 31.25it/s, loss=0.231, v_num=0]``.

No host-device synchronisation per step: a batch's loss tensor is only kept (no copy, no read);
loss and metric values are read at refresh points and at epoch ends only.
"""
from __future__ import annotations

import io
import math
import sys
import warnings
from collections import deque
from typing import Any, Deque, Dict, List, Optional, TextIO, Union

import torch
from tqdm import tqdm as _tqdm

from fastloop.callback import Callback
from fastloop.callbacks.progress_lines import (
    Bar, LineBar, Number, Tqdm, _is_terminal, convert_inf, plain_line, postfix_text,
)

_BAR_SLOTS = ("_main_progress_bar", "_val_progress_bar", "_test_progress_bar", "_predict_progress_bar")


class TQDMProgressBar(Callback):
    """The default progress bar (``Trainer(enable_progress_bar=True)`` adds one).

    Args:
        refresh_rate: redraw every this many batches; 0 disables the bars. The default is 20,
            not Lightning's 1: each redraw reads the loss and the progress-bar metrics, a
            host-device synchronisation that would otherwise stall every fast step.
        process_position: offset of the bars in lines, to stack them under other bars.
        stream: where to draw; ``None`` is ``sys.stderr`` looked up when a bar is created.
            Bars are redrawn only when it is a terminal (``isatty()``); elsewhere each bar
            writes one finished line.

    Override ``get_metrics`` to change the postfix, or the ``init_*_tqdm`` methods to change a bar.
    ``copy.deepcopy`` and ``pickle`` work at any time: copies drop the live bars, the trainer and
    the kept losses, and keep the stream only when it is an ``io.StringIO`` (else stderr).
    """

    loss_window = 20  # training losses averaged into the displayed ``loss``

    def __init__(self, refresh_rate: int = 20, process_position: int = 0, stream: Optional[TextIO] = None) -> None:
        if isinstance(refresh_rate, bool) or not isinstance(refresh_rate, int) or refresh_rate < 0:
            raise ValueError(f"TQDMProgressBar refresh_rate must be an int >= 0, got {refresh_rate!r}")
        if isinstance(process_position, bool) or not isinstance(process_position, int) or process_position < 0:
            raise ValueError(f"TQDMProgressBar process_position must be an int >= 0, got {process_position!r}")
        self._refresh_rate = refresh_rate
        self._process_position = process_position
        self._stream = stream
        self._enabled = True
        self._trainer: Any = None
        self._main_progress_bar: Optional[Bar] = None
        self._val_progress_bar: Optional[Bar] = None
        self._test_progress_bar: Optional[Bar] = None
        self._predict_progress_bar: Optional[Bar] = None
        self._current_eval_dataloader_idx: Optional[int] = None
        self._losses: Deque[torch.Tensor] = deque(maxlen=self.loss_window)
        self._train_batches_done = 0  # in the current epoch
        self._val_batches_done = 0  # validation batches run inside the current training epoch

    # ------------------------------------------------------------------ copying
    def __getstate__(self) -> Dict[str, Any]:
        # Live bars, the trainer and kept loss tensors are display state, not configuration; a
        # stream other than a StringIO (a terminal, a file) cannot be copied: the copy uses stderr.
        state = dict(vars(self))
        for slot in _BAR_SLOTS:
            state[slot] = None
        state["_trainer"] = None
        state["_losses"] = deque(maxlen=self.loss_window)
        if not isinstance(self._stream, io.StringIO):
            state["_stream"] = None
        return state

    # --------------------------------------------------------------- properties
    @property
    def trainer(self) -> Any:
        if self._trainer is None:
            raise TypeError(f"{type(self).__name__}.trainer is not set: the bar has not been set up by a Trainer yet")
        return self._trainer

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def refresh_rate(self) -> int:
        return self._refresh_rate

    @property
    def process_position(self) -> int:
        return self._process_position

    @property
    def is_enabled(self) -> bool:
        return self._enabled and self.refresh_rate > 0

    @property
    def is_disabled(self) -> bool:
        return not self.is_enabled

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def _bar(self, slot: str) -> Bar:
        bar = getattr(self, slot)
        if bar is None:
            raise TypeError(f"{type(self).__name__}.{slot} is not set: that bar is created when its run starts")
        return bar

    main_progress_bar = property(lambda self: self._bar("_main_progress_bar"),
                                 lambda self, bar: setattr(self, "_main_progress_bar", bar))
    val_progress_bar = property(lambda self: self._bar("_val_progress_bar"),
                                lambda self, bar: setattr(self, "_val_progress_bar", bar))
    test_progress_bar = property(lambda self: self._bar("_test_progress_bar"),
                                 lambda self, bar: setattr(self, "_test_progress_bar", bar))
    predict_progress_bar = property(lambda self: self._bar("_predict_progress_bar"),
                                    lambda self, bar: setattr(self, "_predict_progress_bar", bar))

    sanity_check_description = "Sanity Checking"
    train_description = "Training"
    validation_description = "Validation"
    test_description = "Testing"
    predict_description = "Predicting"

    @property
    def train_batch_idx(self) -> int:
        """Training batches finished in the current epoch."""
        return self._train_batches_done

    @property
    def total_train_batches(self) -> Number:
        """Training batches per epoch (``inf`` for a loader without ``len``)."""
        return self.trainer.num_training_batches

    @property
    def total_val_batches(self) -> Number:
        """Validation batches of one validation run, 0 when this epoch does not validate."""
        trainer = self.trainer
        enabled = getattr(trainer, "enable_validation", None)
        if enabled is None:
            enabled = trainer.validation_enabled
        every_n = _trainer_setting(trainer, "check_val_every_n_epoch")
        if not enabled or (every_n is not None and (trainer.current_epoch + 1) % every_n != 0):
            return 0
        counts = getattr(trainer, "num_val_batches", None)
        if counts is None:
            counts = trainer.data.stage_data("val", trainer.config.limits.limit_val_batches).max_batches
        return sum(counts)

    @property
    def total_batches_current_epoch(self) -> Number:
        """The main bar's total: training batches plus every validation run due this epoch."""
        trainer = self.trainer
        train, val = self.total_train_batches, self.total_val_batches
        if val and not math.isinf(train) and not math.isinf(val):
            interval = trainer.val_check_batch
            if _trainer_setting(trainer, "check_val_every_n_epoch") is None:
                done = getattr(trainer.fit_loop, "total_batch_idx", -1) + 1  # batches of earlier epochs
                runs = (done + train) // interval - done // interval
            else:
                runs = train // interval
            val = val * int(runs)
        return train + val

    # -------------------------------------------------------------- bar factory
    def _new_bar(self, desc: str, position: int, leave: bool, initial: int = 0, smoothing: float = 0.3) -> Bar:
        stream = self.stream
        if not _is_terminal(stream):
            return LineBar(desc, stream, disable=self.is_disabled)
        return Tqdm(desc=desc, position=position, disable=self.is_disabled, leave=leave, dynamic_ncols=True,
                    file=stream, initial=initial, smoothing=smoothing)

    def init_sanity_tqdm(self) -> Bar:
        return self._new_bar(self.sanity_check_description, 2 * self.process_position, leave=False)

    def init_train_tqdm(self) -> Bar:
        return self._new_bar(self.train_description, 2 * self.process_position, leave=True,
                             initial=self.train_batch_idx, smoothing=0)

    def init_validation_tqdm(self) -> Bar:
        has_main_bar = self.trainer.state.fn != "validate"
        return self._new_bar(self.validation_description, 2 * self.process_position + has_main_bar,
                             leave=not has_main_bar)

    def init_test_tqdm(self) -> Bar:
        return self._new_bar(self.test_description, 2 * self.process_position, leave=True)

    def init_predict_tqdm(self) -> Bar:
        return self._new_bar(self.predict_description, 2 * self.process_position, leave=True, smoothing=0)

    # ------------------------------------------------------------------ metrics
    def get_metrics(self, trainer: Any, pl_module: Any) -> Dict[str, Union[int, str, float]]:
        """What the main bar shows after its counts: ``loss``, ``v_num`` and the progress-bar
        metrics (as floats). Override it to change the postfix; it is only called at refresh
        points, so it may read device values."""
        standard = self._standard_metrics(trainer, pl_module)
        shown: Dict[str, Any] = {}
        for name, value in trainer.progress_bar_metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()  # host sync: progress bar refresh point
            shown[name] = value
        duplicates = sorted(standard.keys() & shown.keys())
        if duplicates:
            warnings.warn(f"The progress bar already shows {', '.join(duplicates)!s}; `self.log(..., prog_bar=True)` "
                          "of the same name replaces it. Rename the metric or override `get_metrics()`.")
        return {**standard, **shown}

    def _standard_metrics(self, trainer: Any, pl_module: Any) -> Dict[str, Union[int, str]]:
        items: Dict[str, Union[int, str]] = {}
        if getattr(pl_module, "automatic_optimization", True):
            loss = float("nan")
            if self._losses:
                mean = torch.stack(list(self._losses)).float().mean() * trainer.accumulate_grad_batches
                loss = mean.item()  # host sync: progress bar refresh point
            items["loss"] = f"{loss:.3g}"
        loggers = getattr(trainer, "loggers", None) or []
        if loggers:
            version = loggers[0].version if len(loggers) == 1 else "_".join(
                dict.fromkeys(str(logger.version) for logger in loggers))
            if version is not None:
                items["v_num"] = version[-4:] if isinstance(version, str) else version
        return items

    def _record_losses(self, outputs: Any) -> None:
        """Keep the batch's loss tensors (no read): one dict per optimizer, or a list of them."""
        for output in outputs if isinstance(outputs, list) else [outputs]:
            if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
                self._losses.append(output["loss"])

    # ------------------------------------------------------------------ drawing
    def _should_update(self, current: int, total: Optional[Number]) -> bool:
        return self.is_enabled and (current % self.refresh_rate == 0 or current == total)

    def _show_main(self, trainer: Any, pl_module: Any, n: int) -> None:
        """Set the main bar's count and postfix and draw it once (a line bar only keeps the count:
        its postfix is read once, when its line is written)."""
        bar = self._main_progress_bar
        if bar is None or bar.disable:
            return
        bar.n = n
        if not isinstance(bar, LineBar):
            bar.set_postfix_str(postfix_text(self.get_metrics(trainer, pl_module)), refresh=False)
            bar.refresh()

    @staticmethod
    def _start_segment(bar: Bar, desc: str, total: Optional[Number]) -> None:
        """Reset ``bar`` for a new epoch or dataloader: one draw, already with ``desc``."""
        if isinstance(bar, LineBar):
            bar.emit()
        bar.set_description(desc, refresh=False)
        bar.reset(convert_inf(total))
        bar.initial = 0

    def _eval_bar_start(self, bar: Optional[Bar], desc: str, totals: List[Number], dataloader_idx: int) -> None:
        if bar is None or self._current_eval_dataloader_idx == dataloader_idx:
            return
        self._current_eval_dataloader_idx = dataloader_idx
        self._start_segment(bar, f"{desc} DataLoader {dataloader_idx}", totals[dataloader_idx])

    def _eval_bar_update(self, bar: Optional[Bar], batch_idx: int) -> None:
        if bar is not None and not bar.disable and self._should_update(batch_idx + 1, bar.total):
            bar.n = batch_idx + 1
            bar.refresh()

    def _close(self, slot: str) -> None:
        bar = getattr(self, slot)
        if bar is not None:
            bar.close()

    def _close_all(self) -> None:
        for slot in _BAR_SLOTS:
            self._close(slot)
        self._current_eval_dataloader_idx = None

    def print(self, *args: Any, sep: str = " ", **kwargs: Any) -> None:
        """``print`` (to stdout unless ``file=``) that does not break a bar being redrawn: through
        ``tqdm.write``, which clears the bars, prints, and redraws them."""
        text = sep.join(map(str, args))
        live = [getattr(self, slot) for slot in _BAR_SLOTS]
        drawn = [bar for bar in live if isinstance(bar, _tqdm) and not bar.disable]
        if drawn:
            drawn[0].write(text, file=kwargs.get("file") or sys.stdout, end=kwargs.get("end", "\n"))
        else:
            print(text, **kwargs)

    # -------------------------------------------------------------------- hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer
        if not getattr(trainer, "is_global_zero", True):
            self.disable()

    def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
        self._val_progress_bar = self.init_sanity_tqdm()

    def on_sanity_check_end(self, trainer: Any, pl_module: Any) -> None:
        self._close("_val_progress_bar")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._losses.clear()
        self._main_progress_bar = self.init_train_tqdm()

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._train_batches_done = self._val_batches_done = 0
        self._start_segment(self.main_progress_bar, f"Epoch {trainer.current_epoch}", self.total_batches_current_epoch)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if getattr(pl_module, "automatic_optimization", True):
            self._record_losses(outputs)
        self._train_batches_done = batch_idx + 1
        current = self._train_batches_done + self._val_batches_done
        bar = self._main_progress_bar
        if bar is not None and self._should_update(current, bar.total):
            self._show_main(trainer, pl_module, current)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        bar = self._main_progress_bar
        if bar is None or bar.disable:
            return
        current = self._train_batches_done + self._val_batches_done
        postfix = postfix_text(self.get_metrics(trainer, pl_module))
        if isinstance(bar, LineBar):
            bar.n, bar.postfix = current, postfix
            bar.emit()
        elif bar.n != current or bar.postfix != postfix:  # draw only what changed since the last refresh
            bar.n = current
            bar.set_postfix_str(postfix, refresh=False)
            bar.refresh()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close("_main_progress_bar")

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._val_progress_bar = self.init_validation_tqdm()

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        desc = self.sanity_check_description if trainer.sanity_checking else self.validation_description
        self._eval_bar_start(self._val_progress_bar, desc, trainer.eval_data().max_batches, dataloader_idx)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        self._eval_bar_update(self._val_progress_bar, batch_idx)
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            # The main bar counts the batch but draws once, at on_validation_end, with the new metrics.
            self._val_batches_done += 1

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._show_main(trainer, pl_module, self._train_batches_done + self._val_batches_done)
        self._close("_val_progress_bar")
        self._current_eval_dataloader_idx = None

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._test_progress_bar = self.init_test_tqdm()

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._eval_bar_start(self._test_progress_bar, self.test_description, trainer.eval_data().max_batches,
                             dataloader_idx)

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None:
        self._eval_bar_update(self._test_progress_bar, batch_idx)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._close("_test_progress_bar")
        self._current_eval_dataloader_idx = None

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._predict_progress_bar = self.init_predict_tqdm()

    def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        self._eval_bar_start(self._predict_progress_bar, self.predict_description, trainer.predict_data().max_batches,
                             dataloader_idx)

    def on_predict_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        self._eval_bar_update(self._predict_progress_bar, batch_idx)

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._close("_predict_progress_bar")
        self._current_eval_dataloader_idx = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        bar = self._main_progress_bar
        if bar is not None and not bar.disable:
            bar.n = self._train_batches_done + self._val_batches_done  # closed showing where it stopped
        self._close_all()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close_all()


def _trainer_setting(trainer: Any, name: str) -> Any:
    """A validation-schedule setting: the trainer attribute when it has one, else its config."""
    if hasattr(trainer, name):
        return getattr(trainer, name)
    return getattr(trainer.config.validation, name)


ProgressBar = TQDMProgressBar

__all__ = ["LineBar", "ProgressBar", "TQDMProgressBar", "Tqdm", "convert_inf", "plain_line", "postfix_text"]
