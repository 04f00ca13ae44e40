"""A flow module that can also be called as its flow.

`flows/align.py` defines both the `AlignParams` model and the `align` flow. Users write
`from flows import align; align(AlignParams(...))` (the flow) and `import flows.align as m;
m.AlignParams` (the module), and tests patch `flows.align.<name>`. A package attribute can hold
only one object, and Python's import system sets it to the module whenever the submodule is
imported, so the object under that name must be the module. Making that module callable (and
forwarding flow attributes such as `.fn`, `.name`, `.deploy`, `.serve` to the flow) serves all
three uses; every other module attribute is the module's own, so `mock.patch` works.
"""

import sys
import types


class FlowModule(types.ModuleType):
    """The module's class once `expose_flow` ran: module namespace first, then the flow."""

    _flow_name: str

    def __call__(self, *args, **kwargs):
        return getattr(self, self._flow_name)(*args, **kwargs)

    def __getattr__(self, name: str):
        # only reached for names the module itself lacks
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.__dict__[self.__dict__["_flow_name"]], name)

    def __repr__(self) -> str:
        return f"<flow module {self.__name__!r}: callable as flow {self._flow_name!r}>"


def expose_flow(module_name: str, flow_name: str) -> None:
    """Make module `module_name` callable as its flow `flow_name` (call at the module's end)."""
    module = sys.modules[module_name]
    module._flow_name = flow_name
    module.__class__ = FlowModule
