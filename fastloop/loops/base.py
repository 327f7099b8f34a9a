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
``connect()`` swaps children for given loops; ``replace()`` swaps them for new loops built like
the old ones, carrying the old ones' children over.

``load_state_dict()`` stores the saved counters as they are (``state_dict()`` right after it
returns the same dict); each loop's ``reset()`` decides, when restarting, what to redo.

A deep copy of a loop copies its state and children but not its trainer: the copy is attached
to the same trainer, unless the trainer itself is being deep-copied (``copy.deepcopy(trainer)``),
in which case it is attached to the trainer's copy. Objects rebuilt at every entry point (built
step functions, data fetchers, generators) are not copied: the copy gets their empty value.

``TrainingBatchLoop`` and ``OptimizerLoop`` run once per batch; for their exact classes
``run`` is written out with their own hooks inlined (the same calls and state changes, without
the no-op ones). Their subclasses run this generic skeleton.
"""
from __future__ import annotations

import copy
import inspect
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Type, Union

from fastloop.loops.progress import BaseProgress

if TYPE_CHECKING:
    from fastloop.trainer import Trainer


def _shape(parameters: Any) -> List[Tuple[str, Any]]:
    return [(p.name, p.kind) for p in parameters.values()]


class Loop(ABC):
    """Base class of every loop. Subclasses define ``done``, ``reset`` and ``advance``."""

    # Attributes rebuilt for every run, and their empty values: copies and pickles of a loop
    # get these instead of live threads, compiled graphs or references into the trainer.
    # Merged along the class hierarchy; only attributes the instance has are replaced.
    _runtime_attributes: Dict[str, Any] = {"step_report": None}

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

    # Names under which a loop may hold a child it does not have yet (left None in ``__init__``),
    # e.g. a wrapper's ``fit_loop``: ``connect(fit_loop=trainer.fit_loop)`` fills the slot.
    child_slots: Tuple[str, ...] = ()

    def connect(self, **loops: "Loop") -> None:
        """Replace child loops by name, e.g. ``batch_loop.connect(optimizer_loop=MyLoop())``.

        Only attributes that already hold a loop, or are named in ``child_slots``, can be set.
        The new child is attached to this loop's trainer at once when there is one (and again
        when an entry point starts).
        """
        for name, loop in loops.items():
            if loop is None:
                continue
            current = vars(self).get(name)
            if not isinstance(current, Loop) and name not in self.child_slots:
                valid = ", ".join(dict.fromkeys([n for n, _ in self.children()] + list(self.child_slots))) or "none"
                raise ValueError(
                    f"{type(self).__name__}.connect() got unknown child loop `{name}`; "
                    f"its child loops are: {valid}"
                )
            if not isinstance(loop, Loop):
                raise TypeError(f"`{name}` must be a Loop, got {type(loop).__name__}")
            setattr(self, name, loop)
            if self._trainer is not None:
                loop.trainer = self._trainer

    def replace(self, **loops: Union["Loop", Type["Loop"]]) -> Union["Loop", Tuple["Loop", ...]]:
        """Swap child loops for new ones, e.g. ``fit_loop.replace(epoch_loop=MyEpochLoop)``.

        Each value is a ``Loop`` instance or a ``Loop`` subclass. A class is instantiated with
        the old child's constructor arguments: its ``__init__`` signature must equal the old
        child's (parameter names and kinds), and each argument is read from the old child's
        attribute of the same name.
        The old child's own children are connected into the new loop, which gets this loop's
        trainer (when attached). Returns the new loop, or a tuple of them in argument order.
        """
        new_loops: Dict[str, Loop] = {}
        for name, value in loops.items():
            old = vars(self).get(name)
            if not isinstance(old, Loop):
                valid = ", ".join(n for n, _ in self.children()) or "none"
                raise ValueError(
                    f"{type(self).__name__}.replace() got unknown child loop `{name}`; its child loops are: {valid}"
                )
            if isinstance(value, type) and issubclass(value, Loop):
                new = self._build_like(old, value)
            elif isinstance(value, Loop):
                new = value
            else:
                shown = value.__name__ if isinstance(value, type) else type(value).__name__
                raise TypeError(f"`{name}` must be a Loop subclass or a Loop instance, got {shown}")
            grandchildren = dict(old.children())
            if grandchildren:
                new.connect(**grandchildren)
            if self._trainer is not None:
                new.trainer = self._trainer
            new_loops[name] = new
        self.connect(**new_loops)
        new = tuple(new_loops.values())
        return new[0] if len(new) == 1 else new

    def _build_like(self, old: "Loop", cls: Type["Loop"]) -> "Loop":
        """``cls(**arguments)`` with ``old``'s constructor arguments (``replace``)."""
        old_params = inspect.signature(type(old).__init__).parameters
        # Names and kinds must match (arguments are passed by name); annotations and defaults may differ.
        if _shape(inspect.signature(cls.__init__).parameters) != _shape(old_params):
            raise TypeError(
                f"`{type(self).__name__}.replace({cls.__name__})` can only be used if the `__init__` "
                f"signatures match but `{type(old).__name__}` does not; pass an instance instead"
            )
        arguments = {}
        for param in list(old_params.values())[1:]:  # after ``self``
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            try:
                arguments[param.name] = old._init_argument(param.name)
            except AttributeError:
                raise TypeError(
                    f"`{type(self).__name__}.replace({cls.__name__})` cannot rebuild `{type(old).__name__}`: it has "
                    f"no attribute `{param.name}` for the `__init__` argument of that name; pass an instance instead"
                ) from None
        return cls(**arguments)

    def _init_argument(self, name: str) -> Any:
        """The value this loop was built with for ``__init__`` argument ``name`` (``replace``)."""
        return getattr(self, name)

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
        for name, child in self.children():
            child._load_tree(state_dict, prefix + name + ".")

    # ------------------------------------------------------------------ copies
    def _runtime_defaults(self) -> Dict[str, Any]:
        defaults: Dict[str, Any] = {}
        for klass in reversed(type(self).__mro__):
            defaults.update(vars(klass).get("_runtime_attributes", {}))
        return defaults

    def __deepcopy__(self, memo: Dict[int, Any]) -> "Loop":
        cls = type(self)
        copied = cls.__new__(cls)
        memo[id(self)] = copied
        defaults = self._runtime_defaults()
        state = copied.__dict__  # set directly: a subclass may define __getattr__ or properties
        for name, value in vars(self).items():
            if name == "_trainer":
                # The trainer's copy while ``copy.deepcopy(trainer)`` runs; otherwise the same trainer.
                state[name] = memo.get(id(value), value)
            elif name in defaults:
                state[name] = defaults[name]
            else:
                state[name] = copy.deepcopy(value, memo)
        return copied

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(vars(self))
        for name, value in self._runtime_defaults().items():
            if name in state:
                state[name] = value
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # Defined so that unpickling never falls back to a subclass's ``__getattr__``.
        self.__dict__.update(state)
