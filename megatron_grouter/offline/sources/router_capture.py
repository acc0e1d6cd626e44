"""Run a model only as far as one router, and keep that router's logits.

A forward hook on the router module records its logits and then raises, which unwinds the model's
forward right there: the experts of that layer and every later layer never run (in a partially
loaded model they have no weights at all). Every supported transformers router returns
`(router_logits, scores, indices)`; a router that returns a bare tensor is taken as the logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class _RouterReached(Exception):
    """Internal signal: the router has run and its logits are stored."""


def run_until_router(router: nn.Module, run_model: Callable[[], object], logits_index: int = 0,
                     keep_output: list | None = None) -> torch.Tensor:
    """Call `run_model()` and return the logits `router` produced, as float32 [tokens, E].

    `logits_index` says where the logits sit in a tuple output (Llama-4's router returns
    `(scores, logits)`). When `keep_output` is a list, the router's whole output is appended to it
    (callers use the selected expert ids it returns). The hook is removed again before returning,
    whatever happens.
    """
    captured: list[torch.Tensor] = []

    def keep_logits_and_stop(module: nn.Module, inputs: tuple, output: object) -> None:
        logits = output[logits_index] if isinstance(output, tuple) else output
        captured.append(logits.detach().float())
        if keep_output is not None:
            keep_output.append(output)
        raise _RouterReached

    handle = router.register_forward_hook(keep_logits_and_stop)
    try:
        run_model()
    except _RouterReached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"the model's forward finished without calling router {type(router).__name__}")
    return captured[0]
