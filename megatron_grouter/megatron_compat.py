"""Everything that differs between the megatron-core releases we support, in one place.

Supported: megatron-core >=0.16.1,<0.20 (CI: 0.16.1 on Python 3.11, 0.19.2 on Python 3.12; the
layer-spec answers below were also read against 0.17.1 and 0.18.2 and exercised by
`tests/training/test_megatron_seams.py` with those releases installed over 0.19.2). Each answer
says which releases need it. The CPU answers to megatron's CUDA assumptions live in
`runtime/cpu_compat.py`, each tagged with the releases it applies to through `needs()` below.

Reading this module imports nothing from megatron-core: the version check runs at
`import megatron_grouter` from the installed distribution's metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import logging

SUPPORTED_RANGE = ">=0.16.1,<0.20"
_LOWEST = (0, 16, 1)
_FIRST_UNSUPPORTED = (0, 20)


class UnsupportedMegatronCore(ImportError):
    """megatron-core is missing or outside SUPPORTED_RANGE; the message is one line."""


def parse_version(text: str) -> tuple[int, ...]:
    """'0.19.2' -> (0, 19, 2); pre/post/local suffixes ('0.17.0rc1', '0.16.1+nv25.11') are ignored
    beyond their numeric release part."""
    release = []
    for part in text.split("+")[0].split("."):
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        release.append(int(digits))
        if len(digits) < len(part):
            break
    return tuple(release)


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None


def unsupported_reason(version: str | None) -> str | None:
    """One line saying why `version` cannot be used, or None when it is supported."""
    fix = f"install a supported release: pip install 'megatron-core{SUPPORTED_RANGE}'"
    if version is None:
        return f"megatron-grouter needs megatron-core {SUPPORTED_RANGE}, which is not installed; {fix}"
    release = parse_version(version)
    if not _LOWEST <= release < _FIRST_UNSUPPORTED:
        return (f"megatron-core {version} is not supported: megatron-grouter needs megatron-core "
                f"{SUPPORTED_RANGE}; {fix}")
    return None


def check_supported(version: str | None = None) -> str:
    """The installed (or given) megatron-core version; UnsupportedMegatronCore when outside the range."""
    version = installed_version() if version is None else version
    reason = unsupported_reason(version)
    if reason:
        raise UnsupportedMegatronCore(reason)
    return version


def needs(lowest: str, below: str | None = None, version: str | None = None) -> bool:
    """Whether the installed megatron-core is in [lowest, below): the releases an answer is for."""
    release = parse_version(version or installed_version() or "0")
    return parse_version(lowest) <= release and (below is None or release < parse_version(below))


# ---------------------------------------------------------------------------------------------
# Answer 1 — how a layer spec names its MoE layer.
#   0.16.x–0.17.x: `ModuleSpec(module=MoELayer, submodules=MoESubmodules(...))`
#   0.18.0+:       `functools.partial(MoELayer, submodules=MoESubmodules(...))`
# Either way we keep megatron's experts and shared experts and put our layer class and router in.

def plugin_moe_spec(mlp_spec, layer_class: type, router_builder, **layer_kwargs):
    """`mlp_spec` with `layer_class` as its MoE layer and `router_builder` as its router, in the
    same form megatron gave it; None when `mlp_spec` is not an MoE layer (a dense MLP)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(mlp_spec, ModuleSpec) and isinstance(mlp_spec.module, type) \
            and issubclass(mlp_spec.module, MoELayer):
        submodules = dataclasses.replace(mlp_spec.submodules, router=router_builder)
        return ModuleSpec(module=layer_class, params={**mlp_spec.params, **layer_kwargs},
                          submodules=submodules, metainfo=dict(mlp_spec.metainfo))
    if isinstance(mlp_spec, functools.partial) and isinstance(mlp_spec.func, type) \
            and issubclass(mlp_spec.func, MoELayer):
        submodules = dataclasses.replace(mlp_spec.keywords["submodules"], router=router_builder)
        return functools.partial(layer_class, *mlp_spec.args,
                                 **{**mlp_spec.keywords, **layer_kwargs, "submodules": submodules})
    return None


def replace_in_spec(spec, old: type, new: type):
    """`spec` with every use of the module class `old` replaced by `new`, in whichever form the
    release writes specs (ModuleSpec, functools.partial, submodule dataclasses, lists); parts that
    do not use `old` are returned as they are (never rebuilt), configs are not entered."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.transformer.spec_utils import ModuleSpec

    def walk(node):
        if node is old:
            return new
        if isinstance(node, ModuleSpec):
            module, submodules = walk(node.module), walk(node.submodules)
            if module is node.module and submodules is node.submodules:
                return node
            return ModuleSpec(module=module, params=dict(node.params), submodules=submodules,
                              metainfo=dict(node.metainfo))
        if isinstance(node, functools.partial):
            func, args = walk(node.func), [walk(arg) for arg in node.args]
            keywords = {key: walk(value) for key, value in node.keywords.items()}
            if func is node.func and all(a is b for a, b in zip(args, node.args)) \
                    and all(keywords[key] is node.keywords[key] for key in keywords):
                return node
            return functools.partial(func, *args, **keywords)
        if isinstance(node, list):
            items = [walk(item) for item in node]
            return node if all(a is b for a, b in zip(items, node)) else items
        if dataclasses.is_dataclass(node) and not isinstance(node, (type, ModelParallelConfig)):
            changes = {field.name: walk(getattr(node, field.name))
                       for field in dataclasses.fields(node) if field.init}
            changes = {name: value for name, value in changes.items() if value is not getattr(node, name)}
            return dataclasses.replace(node, **changes) if changes else node
        return node

    return walk(spec)


# ---------------------------------------------------------------------------------------------
# Answer 2 — 0.16.x–0.17.x: TransformerLayer hands `pg_collection` only to a spec whose module
# *is* MoELayer (an identity test) and logs "Unknown MLP type: <class '...ModuleSpec'>. Using
# default kwargs." for any other module, once per layer. Our layer then builds its groups with
# megatron's `get_default_pg_collection()` — the same parallel_state groups GPTModel uses without
# an explicit collection. While our model is built (our spec names no other unknown module: dense
# layers stay megatron's MLP) that notice is dropped from that one logger. 0.18.0+ passes
# `pg_collection` to any MLP builder.

class _DropUnknownMlpNotice(logging.Filter):
    NOTICE = "Unknown MLP type: <class 'megatron.core.transformer.spec_utils.ModuleSpec'>"

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.NOTICE)


@contextlib.contextmanager
def building_plugin_layers():
    """While a model with our MoE layers is built (0.16.x–0.17.x only)."""
    if not needs("0.16.1", "0.18.0"):
        yield
        return
    logger = logging.getLogger("megatron.core.transformer.transformer_layer")
    notice = _DropUnknownMlpNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def default_pg_collection():
    """megatron's process groups of the current parallel_state (all supported releases)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    return get_default_pg_collection()


# ---------------------------------------------------------------------------------------------
# Answer 3 — 0.17.0+: MoELayer builds its router with an extra `is_mtp_layer` keyword. Our routers
# take megatron's keywords as `**megatron_kwargs` and pass them on to megatron's Router, so the
# same classes serve every release (no function needed here; recorded for the next reader).


# ---------------------------------------------------------------------------------------------
# Answer 4 — where the routers' auxiliary losses are tracked for logging.
#   0.16.x–0.17.x: `moe_utils.get_moe_layer_wise_logging_tracker()`, the live dict
#                  {name: {"values": [num_layers] tensor, ...}}, emptied by `clear_aux_losses_tracker()`.
#   0.18.0+:       `moe_logging.get_moe_metrics_tracker()` (entries with `.values`, `.clear()`); the old
#                  functions still exist but are deprecated, and the old getter returns a *copy*, so
#                  clearing it clears nothing.

def aux_loss_values() -> dict:
    """{loss name: [layers] tensor of its values summed over this step's micro-batches}."""
    if needs("0.18.0"):
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

        return {name: entry.values for name, entry in get_moe_metrics_tracker().metrics.items()}
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return {name: entry["values"] for name, entry in get_moe_layer_wise_logging_tracker().items()}


def clear_aux_losses(new_model: bool = False) -> None:
    """Zero every tracked auxiliary loss (after a step is logged); for a `new_model` also drop the
    entries, which are sized by the number of layers of the model that created them."""
    if needs("0.18.0"):
        from megatron.core.transformer.moe import moe_logging

        if new_model:
            moe_logging.destroy_moe_metrics_tracker()
        else:
            moe_logging.get_moe_metrics_tracker().clear()
        return
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    if new_model:
        get_moe_layer_wise_logging_tracker().clear()
    else:
        clear_aux_losses_tracker()
