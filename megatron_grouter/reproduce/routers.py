"""The target runs' routers: names in the report → mg-train overrides.

Baselines are the router presets in conf/router/ (aux_loss, z_loss, aux_loss_free, hash,
probmoe_exact_k, ...). The Grouter runs use the pipeline's Grouters, causal unless named otherwise:
  grouter_raw     the distilled (and, if needed, folded) Grouter, untuned, fixed, routed online
  grouter_tuned   the tuned Grouter, fixed, read from the predispatched routing cache (the headline)
  grouter_hybrid  the tuned Grouter picks the experts, a trainable gate weighs them (cache)
  grouter_tuned_bidirectional
                  the paper's bidirectional encoder (own distill → tune → predispatch chain with
                  grouter.causal=false), fixed, cached, trained with allow_future_context=true:
                  a paper-fidelity row that sees future tokens, never the headline
  grouter_random  control: a randomly initialised Grouter of the same shape (no source knowledge beyond
                  the token ids it reads), tuned for balance exactly like grouter_tuned, fixed, routed
                  online: what freezing alone gives, without transfer from the source
  grouter_warm    control: a learned router (aux loss, unfrozen) that follows and imitates the tuned
                  Grouter's routing for its first target.warm_tokens training tokens, then routes
                  by its own top-k (routing/warm_router.py): transfer without freezing
  grouter_tuned_<variant>
                  the raw Grouter tuned with another objective, `tune.variants.<variant>` (mg-tune
                  overrides, e.g. [kl_weight=1] or [mode=bias]): own tune → predispatch chain, fixed,
                  cached; the report compares the objectives by the target runs' validation loss
"""

from __future__ import annotations

from pathlib import Path

from megatron_grouter.errors import UserError

BIDIRECTIONAL = "grouter_tuned_bidirectional"
RANDOM = "grouter_random"
WARM = "grouter_warm"
GROUTER_RUNS = ("grouter_raw", "grouter_tuned", "grouter_hybrid", BIDIRECTIONAL, RANDOM, WARM)
CONTROLS = (RANDOM, WARM)  # separate freezing from transfer (issue 25)
TUNED_VARIANT_PREFIX = "grouter_tuned_"
# Routers with fixed expert choices: nothing to measure for routing stability.
FIXED_BASELINES = ("hash",)


def tuned_variant(router: str) -> str | None:
    """The tune.variants name of a grouter_tuned_<variant> router, else None."""
    if router == BIDIRECTIONAL or not router.startswith(TUNED_VARIANT_PREFIX):
        return None
    return router[len(TUNED_VARIANT_PREFIX):]


def missing_variant(router: str) -> UserError:
    """The one-line error for a grouter_tuned_<variant> row whose objective is not declared."""
    name = tuned_variant(router)
    return UserError(f"target router {router} needs tune.variants.{name} (the mg-tune overrides of that "
                     f"objective): add '+tune.variants.{name}=[\"kl_weight=1\"]' or put it in the preset")


def is_grouter(router: str) -> bool:
    return router in GROUTER_RUNS or tuned_variant(router) is not None


def is_baseline(router: str) -> bool:
    return not is_grouter(router)


def is_learned(router: str) -> bool:
    return is_baseline(router) and router not in FIXED_BASELINES


def _source(cache: Path | None) -> list[str]:
    return ["router.grouter.source=online"] if cache is None else ["router.grouter.source=cached",
                                                                   f"router.grouter.cache={cache}"]


def router_overrides(router: str, raw: Path, tuned: Path, cache: Path,
                     bidirectional: tuple[Path, Path] | None = None,
                     variants: dict[str, tuple[Path, Path]] | None = None,
                     random: Path | None = None, warm_tokens: int = 0) -> list[str]:
    """mg-train overrides that select `router` for a target run (`bidirectional`: the tuned
    bidirectional Grouter and its cache, for grouter_tuned_bidirectional; `variants`: router name →
    (Grouter, cache) of each grouter_tuned_<variant>; `random`: the tuned random Grouter). A cache
    of None routes online (target.grouter_source=online: the Grouter runs in the target run)."""
    if router == RANDOM:
        if random is None:
            raise UserError(f"target router {RANDOM} needs the random Grouter chain; the pipeline builds it "
                            "when the router is in target.routers")
        return ["router=grouter_fixed", f"router.name={RANDOM}", f"router.grouter.path={random}",
                "router.grouter.source=online"]
    if router == "grouter_raw":
        return ["router=grouter_fixed", "router.name=grouter_raw", f"router.grouter.path={raw}",
                "router.grouter.source=online"]
    if router == "grouter_tuned":
        return ["router=grouter_fixed", "router.name=grouter_tuned", f"router.grouter.path={tuned}",
                *_source(cache)]
    if router == WARM:
        if warm_tokens < 1:
            raise UserError(f"target router {WARM} needs target.warm_tokens > 0 (training tokens it follows the "
                            "Grouter for), e.g. target.warm_tokens=102400")
        return ["router=grouter_warm", f"router.grouter.path={tuned}", *_source(cache),
                f"router.grouter.warm_tokens={int(warm_tokens)}"]
    if router == BIDIRECTIONAL:
        if bidirectional is None:
            raise UserError(f"target router {BIDIRECTIONAL} needs the bidirectional Grouter chain; the "
                            "pipeline builds it when the router is in target.routers")
        grouter, grouter_cache = bidirectional
        return ["router=grouter_fixed", f"router.name={BIDIRECTIONAL}", f"router.grouter.path={grouter}",
                *_source(grouter_cache), "router.grouter.allow_future_context=true"]
    if tuned_variant(router) is not None:
        if not variants or router not in variants:
            raise missing_variant(router)
        grouter, grouter_cache = variants[router]
        return ["router=grouter_fixed", f"router.name={router}", f"router.grouter.path={grouter}",
                *_source(grouter_cache)]
    if router == "grouter_hybrid":
        return ["router=grouter_hybrid", f"router.grouter.path={tuned}", *_source(cache)]
    from megatron_grouter.app import CONF_DIR

    if router.startswith("grouter") or not (Path(CONF_DIR) / "router" / f"{router}.yaml").is_file():
        raise UserError(f"target router {router!r} is unknown; use {', '.join(GROUTER_RUNS)} or a preset "
                        f"in {Path(CONF_DIR) / 'router'}")
    return [f"router={router}"]
