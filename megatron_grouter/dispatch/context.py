"""The dispatch plan of the current micro-batch, handed explicitly to the planned dispatchers.

Like the RoutingContext: created with the model, given to every planned dispatcher at
construction, set by a trainer hook before each forward and cleared after it. Without a plan
(learned routers, evaluation) the dispatchers count tokens per expert themselves.

`verify=True` makes every layer compare the plan with the routing its router actually produced
(one device→host copy per layer): a debug mode that turns a wrong plan into a one-line error
instead of silently mis-sized all-to-alls.
"""

from __future__ import annotations

from megatron_grouter.dispatch.plan import DispatchPlan


class DispatchPlanMismatch(RuntimeError):
    pass


class DispatchContext:
    def __init__(self, verify: bool = False):
        self.verify = verify
        self._plan: DispatchPlan | None = None

    def set(self, plan: DispatchPlan) -> None:
        self._plan = plan

    def clear(self) -> None:
        self._plan = None

    @property
    def plan(self) -> DispatchPlan | None:
        return self._plan
