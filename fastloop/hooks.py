"""One dispatch point for hooks, with the set of overridden hooks decided once.

``HookDispatcher.call(name, *args)`` runs every callback that overrides ``name`` (in the order
the callbacks were given), then the module's hook, and returns the module hook's result. Which
callbacks override which hook is computed when the dispatcher is built, so hooks nobody
overrides cost one dict lookup. The compiled step asks ``overridden_by(name)`` to decide, before
the first step, whether a hook can stay outside the fused graph.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from fastloop.callback import Callback

if TYPE_CHECKING:
    from fastloop.module import Module
    from fastloop.trainer import Trainer

# Callback hooks that receive (trainer, module, *args). Kept in sync with Callback by a test.
CALLBACK_HOOKS = tuple(
    name
    for name, value in vars(Callback).items()
    if callable(value) and (name.startswith("on_") or name in ("setup", "teardown"))
)


def is_overridden(name: str, obj: Any, parent: type) -> bool:
    """Whether ``obj``'s class defines ``name`` differently from ``parent``."""
    method = getattr(type(obj), name, None)
    return method is not None and method is not getattr(parent, name, None)


class HookDispatcher:
    """Calls callback hooks, then module hooks, for one trainer."""

    def __init__(self, trainer: "Trainer", module: "Module", callbacks: Sequence[Callback]) -> None:
        from fastloop.module import Module

        self.trainer = trainer
        self.module = module
        self.callbacks = list(callbacks)
        self.current_hook: Optional[str] = None  # read by Module.log for its defaults
        self._callback_methods: Dict[str, List[Callable[..., Any]]] = {
            name: [getattr(cb, name) for cb in self.callbacks if is_overridden(name, cb, Callback)]
            for name in CALLBACK_HOOKS
        }
        self._module_overrides = {
            name for name in dir(Module) if not name.startswith("_") and is_overridden(name, module, Module)
        }
        # Hooks that run any code at all; ``call`` returns at once for the others.
        self._dispatched = {
            name for name in CALLBACK_HOOKS if self._callback_methods[name] or name in self._module_overrides
        }

    def overridden_by(self, name: str) -> List[str]:
        """Names of the classes (callbacks, then the module) that override hook ``name``."""
        owners = [type(m.__self__).__name__ for m in self._callback_methods.get(name, [])]
        if name in self._module_overrides:
            owners.append(type(self.module).__name__)
        return owners

    def module_overrides(self, name: str) -> bool:
        return name in self._module_overrides

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Callbacks first, then the module; returns the module hook's result.

        The module's defaults for these hooks do nothing, so they are not called: a hook that
        neither the module nor any callback overrides costs one set lookup.
        """
        if name not in self._dispatched:
            return None
        previous, self.current_hook = self.current_hook, name
        try:
            for method in self._callback_methods[name]:
                method(self.trainer, self.module, *args, **kwargs)
            if name in self._module_overrides:
                return getattr(self.module, name)(*args, **kwargs)
            return None
        finally:
            self.current_hook = previous

    def call_callbacks(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Callback-only hooks (for example ``on_sanity_check_start``)."""
        if not self._callback_methods[name]:
            return
        previous, self.current_hook = self.current_hook, name
        try:
            for method in self._callback_methods[name]:
                method(self.trainer, self.module, *args, **kwargs)
        finally:
            self.current_hook = previous

    def call_module(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Module-only hooks (``training_step``, ``configure_optimizers``, ``backward``...)."""
        previous, self.current_hook = self.current_hook, name
        try:
            return getattr(self.module, name)(*args, **kwargs)
        finally:
            self.current_hook = previous
