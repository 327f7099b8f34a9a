"""The ``Loop`` base class: the run skeleton, trainer wiring, child loops and resumable state.

``run(*args, **kwargs)`` does, in order::

    if loop.skip:
        return loop.on_skip()
    loop.reset()
    loop.on_run_start(*args, **kwargs)
    while not loop.done:
        try:
            loop.on_advance_start(*args, **kwargs)
            loop.advance(*args, **kwargs)
            loop.on_advance_end()
            loop._restarting = False      # a full iteration ran: no longer resuming
        except StopIteration:
            break
    loop._restarting = False
    return loop.on_run_end()

Child loops are the attributes of a loop that are themselves loops; they receive the trainer,
the ``restarting`` flag and their share of ``state_dict()`` (under dotted keys) automatically.

``TrainingBatchLoop`` and ``OptimizerLoop`` run once per batch; for their exact classes
``run`` is written out with their own hooks inlined (the same calls and state changes, without
the no-op ones). Their subclasses run this generic skeleton.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Tuple

from fastloop.loops.progress import BaseProgress

if TYPE_CHECKING:
    from fastloop.trainer import Trainer


class Loop(ABC):
    """Base class of every loop. Subclasses define ``done``, ``reset`` and ``advance``."""

    def __init__(self) -> None:
        self._restarting = False
        self._trainer: Optional["Trainer"] = None

    # ----------------------------------------------------------------- wiring
    @property
    def trainer(self) -> "Trainer":
        if self._trainer is None:
            raise RuntimeError("The loop is not attached to a Trainer.")
        return self._trainer

    @trainer.setter
    def trainer(self, trainer: "Trainer") -> None:
        self._trainer = trainer
        for _, child in self.children():
            child.trainer = trainer

    @property
    def is_attached(self) -> bool:
        return self._trainer is not None

    def children(self) -> Iterator[Tuple[str, "Loop"]]:
        """The direct child loops, in attribute order."""
        for name, value in vars(self).items():
            if isinstance(value, Loop):
                yield name, value

    def connect(self, **loops: "Loop") -> None:
        """Replace child loops by name, e.g. ``batch_loop.connect(optimizer_loop=MyLoop())``.

        Only attributes that already hold a loop can be replaced. The new child is attached to
        this loop's trainer at once when there is one (and again when an entry point starts).
        """
        for name, loop in loops.items():
            if loop is None:
                continue
            current = vars(self).get(name)
            if not isinstance(current, Loop):
                valid = ", ".join(n for n, _ in self.children()) or "none"
                raise ValueError(
                    f"{type(self).__name__}.connect() got unknown child loop `{name}`; "
                    f"its child loops are: {valid}"
                )
            if not isinstance(loop, Loop):
                raise TypeError(f"`{name}` must be a Loop, got {type(loop).__name__}")
            setattr(self, name, loop)
            if self._trainer is not None:
                loop.trainer = self._trainer

    @property
    def restarting(self) -> bool:
        """True after ``load_state_dict`` until the first iteration completes."""
        return self._restarting

    @restarting.setter
    def restarting(self, restarting: bool) -> None:
        self._restarting = restarting
        for _, child in self.children():
            child.restarting = restarting

    # --------------------------------------------------------------- skeleton
    @property
    @abstractmethod
    def done(self) -> bool:
        """Checked before every iteration, the first one included."""

    @property
    def skip(self) -> bool:
        """When True, ``run`` returns ``on_skip()`` without calling ``reset``."""
        return False

    def on_skip(self) -> Any:
        return None

    def setup(self) -> None:
        """Called on every loop of a tree (parents first) when an entry point starts.

        The trainer has configured the model and optimizers by then; raise here to reject a
        configuration before the first step.
        """

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if self.skip:
            return self.on_skip()
        self.reset()
        self.on_run_start(*args, **kwargs)
        while not self.done:
            try:
                self.on_advance_start(*args, **kwargs)
                self.advance(*args, **kwargs)
                self.on_advance_end()
                self._restarting = False
            except StopIteration:
                break
        self._restarting = False
        return self.on_run_end()

    @abstractmethod
    def reset(self) -> None:
        """Prepare for a run; consult ``self.restarting`` to resume instead of starting over."""

    def on_run_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_advance_start(self, *args: Any, **kwargs: Any) -> None:
        pass

    @abstractmethod
    def advance(self, *args: Any, **kwargs: Any) -> None:
        """One iteration. Raise ``StopIteration`` to end the loop early."""

    def on_advance_end(self) -> None:
        pass

    def on_run_end(self) -> Any:
        return None

    def teardown(self) -> None:
        for _, child in self.children():
            child.teardown()

    # ------------------------------------------------------------------ state
    def on_save_checkpoint(self) -> Dict[str, Any]:
        """Extra state of this loop, stored under the ``state_dict`` key."""
        return {}

    def on_load_checkpoint(self, state_dict: Dict[str, Any]) -> None:
        pass

    def state_dict(self, destination: Optional[Dict[str, Any]] = None, prefix: str = "") -> Dict[str, Any]:
        """A flat dict: ``prefix + "state_dict"``, one key per progress object, then children."""
        if destination is None:
            destination = {}
        destination[prefix + "state_dict"] = self.on_save_checkpoint()
        for name, value in vars(self).items():
            if isinstance(value, BaseProgress):
                destination[prefix + name] = value.state_dict()
            elif isinstance(value, Loop):
                value.state_dict(destination, prefix + name + ".")
        return destination

    def load_state_dict(self, state_dict: Dict[str, Any], prefix: str = "") -> None:
        """Inverse of ``state_dict``; missing keys are skipped. Leaves the loop ``restarting``."""
        self._load_tree(state_dict, prefix)
        self.restarting = True

    def _load_tree(self, state_dict: Dict[str, Any], prefix: str) -> None:
        for name, value in vars(self).items():
            key = prefix + name
            if isinstance(value, BaseProgress) and key in state_dict:
                value.load_state_dict(state_dict[key])
        if prefix + "state_dict" in state_dict:
            self.on_load_checkpoint(state_dict[prefix + "state_dict"])
        self._on_state_loaded()
        for name, child in self.children():
            child._load_tree(state_dict, prefix + name + ".")

    def _on_state_loaded(self) -> None:
        """Normalise loaded counters before ``restarting`` is set (used by built-in loops)."""
