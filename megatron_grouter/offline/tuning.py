"""Expert tuning (paper §3.3): rebalance a Grouter on the target data, touching only its final layer.

A distilled Grouter inherits its source's load profile, which is imbalanced on new data. Objectives:
- `weights` (the paper's): the encoder is frozen (its hidden states are computed without grad)
  and only the score layer (weight + bias) is trained, with the Switch/GShard load-balancing loss
  L = E·Σ_i f_i·P_i, f_i = share of the token-slots the current top-k routes to i
  (non-differentiable), P_i = mean softmax probability of i. Alone (kl_weight=0, the default)
  nothing ties it to the old routing, so it can give the distilled routing away for balance.
  With kl_weight > 0 the loss adds kl_weight · KL(softmax(distilled logits) ‖ softmax(tuned
  logits)) per token: balance is bought with as little change of the routing distribution as the
  weight allows.
- `bias` (aux-loss-free style, as the released code; the default): no weight changes; the selection bias
  `expert_bias` is nudged each step by rate·σ·sign(mean load − load_i), σ = std of the logits on
  the first batch (so the rate is scale-free). It changes which experts are selected, not the gates.

Stopping: every `check_interval` steps, MaxVioGlobal of *held-out* windows (`stop_tokens` of
them, after the report's windows when the split has enough; their final hidden states are computed
once, the encoder being frozen), not of the training batches: a batch-level target is reached long
before held-out balance is. Tuning stops at `target_max_vio`, after `patience` checks without a
new best, or at the token budget, and keeps the state of the best check (the untuned Grouter's
own, step 0, included): the balance loss alone can churn the routing without balancing held-out
data (measured on the standard preset: 245 steps took held-out MaxVio 0.825 → 0.881 and top-k
agreement to 0.185), and then tuning returns the Grouter it started from rather than a worse one.
The report gives MaxVioGlobal and top-k agreement with the untuned Grouter, before and after, on
the first `eval_tokens` held-out tokens. Tuning keeps the Grouter's causality (only the score
layer / bias change). Data-parallel: gradients and loads are summed with all_reduce.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_grouter.errors import UserError
from megatron_grouter.runtime.distributed import all_reduce_host
from megatron_grouter.grouter.gating import choose_experts, expert_probabilities
from megatron_grouter.training.moe_metrics import max_violation

MODES = ("weights", "bias")


@dataclass(frozen=True)
class TuneSettings:
    mode: str = "bias"  # chosen by target validation loss (docs/results/standard); weights: the paper's
    lr: float = 1.0e-2
    bias_rate: float = 1.0e-2
    batch_size: int = 16
    max_tokens: int = 2_000_000
    target_max_vio: float = 0.2
    check_interval: int = 10          # steps between stop checks
    eval_tokens: int = 200_000        # held-out tokens for the before/after report
    seed: int = 1234
    kl_weight: float = 0.0            # weights mode: weight of KL(distilled ‖ tuned) next to the balance loss
    stop_tokens: int = 100_000        # held-out tokens whose MaxVioGlobal decides the stop
    patience: int = 10                # stop after this many checks without a new best (0: never)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"tuning mode {self.mode!r} is unknown; choose one of {list(MODES)}")
        for name in ("lr", "bias_rate", "batch_size", "max_tokens", "check_interval", "eval_tokens",
                     "stop_tokens"):
            if not getattr(self, name) > 0:
                raise UserError(f"tuning {name}={getattr(self, name)!r} must be positive")
        if self.patience < 0:
            raise UserError(f"tuning patience={self.patience} must be >= 0 (0: run to the token budget)")
        if self.target_max_vio < 0:
            raise UserError(f"tuning target_max_vio={self.target_max_vio} must be >= 0")
        if not self.kl_weight >= 0:
            raise UserError(f"tuning kl_weight={self.kl_weight!r} must be >= 0")
        if self.kl_weight > 0 and self.mode != "weights":
            raise UserError(f"tuning kl_weight={self.kl_weight} applies to mode=weights only, not "
                            f"mode={self.mode}; set kl_weight=0 or mode=weights")

    @property
    def objective(self) -> str:
        """Name of the objective, as reported: weights, weights+kl<w>, bias."""
        return f"weights+kl{self.kl_weight:g}" if self.mode == "weights" and self.kl_weight > 0 else self.mode


@dataclass
class TuneResult:
    grouter: object
    steps: int
    tokens: int
    tokens_per_s: float
    stopped_by: str
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    stop_max_vio: float | None = None  # held-out MaxVioGlobal of the kept state
    kept_step: int = 0                 # the step whose state was kept (0: the untuned Grouter)


def selection_counts(selection_TE: torch.Tensor, topk: int,
                     groups_E: torch.Tensor | None = None) -> torch.Tensor:
    """Token count per expert [E] of the (two-level, with groups) top-k over selection scores."""
    indices_TK = choose_experts(selection_TE, topk, groups_E)
    return torch.bincount(indices_TK.flatten(), minlength=selection_TE.shape[-1])


def load_balancing_loss(logits_TE: torch.Tensor, topk: int, bias_E: torch.Tensor | None = None,
                        counts_E: torch.Tensor | None = None,
                        groups_E: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/GShard loss E·Σ f_i·P_i (1 when perfectly balanced); f from the biased top-k,
    P from the router's distribution (two-level for an expanded Grouter)."""
    num_tokens, num_experts = logits_TE.shape
    if counts_E is None:
        selection_TE = logits_TE.detach() + (0 if bias_E is None else bias_E)
        counts_E = selection_counts(selection_TE, topk, groups_E)
    fraction_E = counts_E.float() / max(float(counts_E.sum()), 1.0)
    mean_prob_E = expert_probabilities(logits_TE.float(), groups_E).mean(dim=0)
    return num_experts * (fraction_E * mean_prob_E).sum()


def routing_kl(reference_logits_TE: torch.Tensor, logits_TE: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(reference) ‖ softmax(logits)): how far tuning moved the routing."""
    reference_logp_TE = torch.log_softmax(reference_logits_TE.float(), dim=-1)
    logp_TE = torch.log_softmax(logits_TE.float(), dim=-1)
    return (reference_logp_TE.exp() * (reference_logp_TE - logp_TE)).sum(-1).mean()


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce_host(tensor.detach().clone()) if dist.is_initialized() else tensor


@torch.no_grad()
def evaluate_balance(grouter, reference, batches, batch_size: int, max_tokens: int,
                     device: torch.device | str = "cpu") -> dict:
    """MaxVioGlobal of `grouter` and its top-k agreement with `reference` on the first held-out windows."""
    from megatron_grouter.offline.affinity import window_row_batches

    rank, world_size = _world()
    num_experts, topk = grouter.config.num_experts, grouter.config.topk
    max_windows = max(1, -(-int(max_tokens) // batches.windows.window))
    load_E = torch.zeros(num_experts, dtype=torch.float64)
    sums = torch.zeros(2, dtype=torch.float64)  # overlap sum, tokens
    for rows in window_row_batches(len(batches), batch_size, rank, world_size, max_windows):
        if len(rows) == 0:
            continue
        tokens_BW, mask_BW = batches.gather(rows)
        tokens_BW, mask_BW = tokens_BW.to(device), mask_BW.to(device)
        tuned_TK = grouter.route(tokens_BW, mask_BW)[0][mask_BW]
        reference_TK = reference.route(tokens_BW, mask_BW)[0][mask_BW]
        load_E += torch.bincount(tuned_TK.flatten().cpu(), minlength=num_experts).double()
        overlap_T = (tuned_TK[:, :, None] == reference_TK[:, None, :]).any(-1).sum(-1)
        sums += torch.tensor([float(overlap_T.sum()) / topk, float(len(tuned_TK))], dtype=torch.float64)
    load_E, sums = _all_sum(load_E), _all_sum(sums)
    return {"max_vio_global": max_violation(load_E), "topk_agreement": float(sums[0] / max(float(sums[1]), 1.0)),
            "tokens": int(sums[1]), "load": load_E.long().tolist()}


def stop_windows(num_windows: int, window: int, eval_tokens: int, stop_tokens: int) -> tuple[int, int]:
    """(first window, count) of the stop check's held-out windows: after the report's windows when
    the split has room for both, else its last windows (then they overlap the report's)."""
    report = -(-int(eval_tokens) // window)
    count = min(num_windows, max(1, -(-int(stop_tokens) // window)))
    first = report if report + count <= num_windows else num_windows - count
    return first, count


@torch.no_grad()
def held_out_hidden(grouter, batches, batch_size: int, max_tokens: int,
                    device: torch.device | str = "cpu", first_window: int = 0) -> torch.Tensor:
    """Final hidden states [T, H] (fp32, on `device`: the stop check reuses them) of this rank's
    share of `max_tokens` of held-out windows from `first_window` on."""
    from megatron_grouter.offline.affinity import window_row_batches

    rank, world_size = _world()
    max_windows = max(1, -(-int(max_tokens) // batches.windows.window))
    hidden = [torch.zeros(0, grouter.config.hidden_size, device=device)]
    for rows in window_row_batches(len(batches), batch_size, rank, world_size, max_windows, first_window):
        if len(rows) == 0:
            continue
        tokens_BW, mask_BW = batches.gather(rows)
        mask_BW = mask_BW.to(device)
        hidden.append(grouter.hidden_states(tokens_BW.to(device), mask_BW)[mask_BW].float())
    return torch.cat(hidden)


@torch.no_grad()
def held_out_max_vio(grouter, hidden_TH: torch.Tensor) -> float:
    """MaxVioGlobal of the (biased, two-level) top-k on held-out hidden states, summed over ranks."""
    device = grouter.score.weight.device
    counts_E = torch.zeros(grouter.config.num_experts, dtype=torch.float64)
    for chunk_TH in hidden_TH.split(65536):
        selection_TE = grouter.score(chunk_TH.to(device)) + grouter.expert_bias
        counts_E += selection_counts(selection_TE, grouter.config.topk, grouter.expert_groups).double().cpu()
    return max_violation(_all_sum(counts_E))


def _freeze_all_but_score(grouter) -> list[torch.nn.Parameter]:
    trainable = []
    for name, parameter in grouter.named_parameters():
        parameter.requires_grad_(name.startswith("score."))
        if parameter.requires_grad:
            trainable.append(parameter)
    return trainable


def tune_grouter(grouter, train_batches, eval_batches, settings: TuneSettings,
                 device: torch.device | str = "cpu", progress: bool = True) -> TuneResult:
    """Tune a copy of `grouter` on `train_batches` (WindowBatches of this rank); see module docstring."""
    from tqdm import tqdm

    rank, world_size = _world()
    reference = copy.deepcopy(grouter).to(device).eval()
    tuned = copy.deepcopy(grouter).to(device).eval()  # eval: no dropout; the encoder is frozen anyway
    topk = tuned.config.topk
    before = evaluate_balance(reference, reference, eval_batches, settings.batch_size, settings.eval_tokens, device)
    first, count = stop_windows(len(eval_batches), eval_batches.windows.window, settings.eval_tokens,
                                settings.stop_tokens)
    stop_hidden_TH = held_out_hidden(tuned, eval_batches, settings.batch_size, count * eval_batches.windows.window,
                                     device, first_window=first)
    trainable = _freeze_all_but_score(tuned)
    optimizer = torch.optim.Adam(trainable, lr=settings.lr) if settings.mode == "weights" else None
    bias_step = None
    step, tokens, stopped_by = 0, 0, "token budget"
    best_vio, best_step, best_state, checks_since_best = (held_out_max_vio(tuned, stop_hidden_TH), 0,
                                                          _tunable_state(tuned), 0)
    bar = tqdm(total=settings.max_tokens, desc=f"tune ({settings.mode})", unit="tok", unit_scale=True,
               disable=not progress or rank != 0, mininterval=2.0)
    started = time.perf_counter()
    while tokens < settings.max_tokens:
        tokens_BW, mask_BW = train_batches.batch(step)
        tokens_BW, mask_BW = tokens_BW.to(device), mask_BW.to(device)
        with torch.no_grad():
            hidden_TH = tuned.hidden_states(tokens_BW, mask_BW)[mask_BW].float()
        logits_TE = tuned.score(hidden_TH)
        counts_E = _all_sum(selection_counts(logits_TE.detach() + tuned.expert_bias, topk,
                                             tuned.expert_groups))
        if optimizer is not None:
            loss = load_balancing_loss(logits_TE, topk, counts_E=counts_E, groups_E=tuned.expert_groups)
            if settings.kl_weight > 0:
                with torch.no_grad():
                    reference_TE = reference.score(hidden_TH)
                loss = loss + settings.kl_weight * routing_kl(reference_TE, logits_TE)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for parameter in trainable:
                parameter.grad = _all_sum(parameter.grad) / world_size
            optimizer.step()
        else:
            if bias_step is None:
                bias_step = settings.bias_rate * float(_all_sum(logits_TE.detach().std().reshape(1)) / world_size)
            with torch.no_grad():
                error_E = counts_E.float().mean() - counts_E.float()
                tuned.expert_bias += bias_step * torch.sign(error_E).to(tuned.expert_bias.device)
        batch_tokens = int(_all_sum(torch.tensor([hidden_TH.shape[0]], dtype=torch.float64)))
        tokens += batch_tokens
        step += 1
        bar.update(batch_tokens)
        if step % settings.check_interval == 0:
            stop_vio = held_out_max_vio(tuned, stop_hidden_TH)
            bar.set_postfix(held_out_max_vio=f"{stop_vio:.3f}", best=f"{best_vio:.3f}",
                            tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):.0f}")
            if stop_vio < best_vio:
                best_vio, best_step, checks_since_best = stop_vio, step, 0
                best_state = _tunable_state(tuned)
            else:
                checks_since_best += 1
            if stop_vio <= settings.target_max_vio:
                stopped_by = f"target held-out MaxVioGlobal {settings.target_max_vio}"
                break
            if settings.patience and checks_since_best >= settings.patience:
                stopped_by = f"no better held-out MaxVioGlobal in {settings.patience} checks"
                break
    bar.close()
    elapsed = max(time.perf_counter() - started, 1e-9)
    _restore_tunable_state(tuned, best_state)
    for parameter in tuned.parameters():
        parameter.requires_grad_(True)
    tuned.eval()
    after = evaluate_balance(tuned, reference, eval_batches, settings.batch_size, settings.eval_tokens, device)
    return TuneResult(grouter=tuned, steps=step, tokens=tokens, tokens_per_s=tokens / elapsed,
                      stopped_by=f"{stopped_by}; kept step {best_step}", before=before, after=after,
                      stop_max_vio=best_vio, kept_step=best_step)


def _tunable_state(grouter) -> dict[str, torch.Tensor]:
    """Copies of what tuning changes: the score layer and the selection bias."""
    state = {f"score.{name}": value.detach().clone() for name, value in grouter.score.state_dict().items()}
    state["expert_bias"] = grouter.expert_bias.detach().clone()
    return state


@torch.no_grad()
def _restore_tunable_state(tuned, state: dict[str, torch.Tensor]) -> None:
    """Put back the best check's state (step 0: the untuned Grouter's)."""
    tuned.score.load_state_dict({name[len("score."):]: value for name, value in state.items()
                                 if name.startswith("score.")})
    tuned.expert_bias.copy_(state["expert_bias"])


def tuning_record(result: TuneResult, settings: TuneSettings) -> dict:
    """Provenance history step of a tuning run (plain JSON)."""
    strip = lambda report: {key: value for key, value in report.items() if key != "load"}  # noqa: E731
    return {"step": "tune", "mode": settings.mode, "objective": settings.objective,
            "kl_weight": settings.kl_weight, "tokens": result.tokens, "steps": result.steps,
            "stopped_by": result.stopped_by, "target_max_vio": settings.target_max_vio,
            "stop_tokens": settings.stop_tokens, "stop_max_vio": result.stop_max_vio,
            "patience": settings.patience, "kept_step": result.kept_step,
            "lr": settings.lr, "bias_rate": settings.bias_rate,
            "before": strip(result.before), "after": strip(result.after)}

