"""The target runs' routers: names in the report → mg-train overrides.

Baselines are the router presets in conf/router/ (aux_loss, z_loss, aux_loss_free, hash,
probmoe_exact_k, ...). The three Grouter runs use the pipeline's Grouters:
  grouter_raw     the distilled (and, if needed, folded) Grouter, untuned, fixed, routed online
  grouter_tuned   the tuned Grouter, fixed, read from the predispatched routing cache
  grouter_hybrid  the tuned Grouter picks the experts, a trainable gate weighs them (cache)
"""

from __future__ import annotations

from pathlib import Path

from megatron_grouter.errors import UserError

GROUTER_RUNS = ("grouter_raw", "grouter_tuned", "grouter_hybrid")
# Routers with fixed expert choices: nothing to measure for routing stability.
FIXED_BASELINES = ("hash",)


def is_baseline(router: str) -> bool:
    return router not in GROUTER_RUNS


def is_learned(router: str) -> bool:
    return is_baseline(router) and router not in FIXED_BASELINES


def router_overrides(router: str, raw: Path, tuned: Path, cache: Path) -> list[str]:
    """mg-train overrides that select `router` for a target run."""
    if router == "grouter_raw":
        return ["router=grouter_fixed", "router.name=grouter_raw", f"router.grouter.path={raw}",
                "router.grouter.source=online"]
    if router == "grouter_tuned":
        return ["router=grouter_fixed", "router.name=grouter_tuned", f"router.grouter.path={tuned}",
                "router.grouter.source=cached", f"router.grouter.cache={cache}"]
    if router == "grouter_hybrid":
        return ["router=grouter_hybrid", f"router.grouter.path={tuned}", "router.grouter.source=cached",
                f"router.grouter.cache={cache}"]
    from megatron_grouter.app import CONF_DIR

    if router.startswith("grouter") or not (Path(CONF_DIR) / "router" / f"{router}.yaml").is_file():
        raise UserError(f"target router {router!r} is unknown; use {', '.join(GROUTER_RUNS)} or a preset "
                        f"in {Path(CONF_DIR) / 'router'}")
    return [f"router={router}"]
