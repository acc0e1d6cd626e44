"""The shape of a Grouter network, as one validated, JSON-round-trippable dataclass.

A Grouter is G(X) = W_s · Enc_N(Emb(X)): it reads token ids and scores every expert. The config is
stored verbatim in each Grouter checkpoint (`config.json` → "architecture"), so every field is a
plain JSON value and `from_dict` refuses anything it does not understand, in one line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from megatron_grouter.errors import UserError

ENCODERS = ("mha", "residual_linear")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
DTYPES = ("float32", "bfloat16")


def swiglu_ffn_size(hidden_size: int, multiple_of: int = 256) -> int:
    """SwiGLU width with the usual parameter budget: 8/3 · hidden, rounded up to `multiple_of`.

    For hidden 512 this is 1536, which puts the paper's 3-layer encoder at ~10M parameters
    (its "60M total, 50M embedding").
    """
    return multiple_of * math.ceil(8 * hidden_size / 3 / multiple_of)


@dataclass(frozen=True)
class GrouterConfig:
    """Architecture and routing rule of a Grouter.

    `topk`, `score_function` and `scaling_factor` describe how logits become routing
    (`Grouter.route`); the rest describe the network. `ffn_hidden_size=None` means
    `swiglu_ffn_size(hidden_size)` and is resolved at construction, so saved configs are explicit.
    `sees_future_tokens` says whether a token's routing may depend on later tokens of its window.
    """

    vocab_size: int
    num_experts: int
    topk: int
    hidden_size: int = 512
    num_layers: int = 3
    num_heads: int = 8
    ffn_hidden_size: int | None = None
    encoder: str = "mha"
    # Causal: the routing of token t reads tokens <= t of its window only (the MHA encoder gets a
    # causal mask), so a causal LM routed by it never sees the future. False: the paper's
    # bidirectional encoder ("global receptive field"); mg-train refuses it for a causal LM unless
    # router.grouter.allow_future_context=true. residual_linear scores each token from its own id,
    # so it is causal by construction either way. Checkpoints written before this field existed
    # load as causal=false (their encoder was bidirectional).
    causal: bool = True
    use_positions: bool = True
    max_seq_length: int = 4096
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    score_function: str = "softmax"
    scaling_factor: float = 1.0
    score_bias: bool = True
    dtype: str = "float32"
    # Two-level routing of an expanded Grouter: expert e belongs to group expert_groups[e]
    # (see gating.py); None: every expert is its own group.
    expert_groups: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None and _is_int(self.hidden_size) and self.hidden_size > 0:
            object.__setattr__(self, "ffn_hidden_size", swiglu_ffn_size(self.hidden_size))
        if isinstance(self.expert_groups, list):
            object.__setattr__(self, "expert_groups", tuple(self.expert_groups))
        _validate(self)

    @property
    def num_groups(self) -> int:
        """Units that top-k chooses among: expert groups, or experts."""
        return self.num_experts if self.expert_groups is None else max(self.expert_groups) + 1

    @property
    def sees_future_tokens(self) -> bool:
        """True when a token's routing can depend on tokens after it (bidirectional MHA encoder)."""
        return not self.causal and self.encoder == "mha" and self.num_layers > 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "GrouterConfig":
        """Build from a dict as written by `to_dict`; unknown or missing keys raise UserError."""
        if not isinstance(values, dict):
            raise UserError(f"Grouter architecture must be a JSON object, got {type(values).__name__}; "
                            "re-save the Grouter")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown Grouter config keys {unknown}; known keys are {sorted(known)}")
        missing = sorted(name for name in ("vocab_size", "num_experts", "topk") if name not in values)
        if missing:
            raise UserError(f"Grouter config lacks required keys {missing}; set them")
        return cls(**values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _validate(config: GrouterConfig) -> None:
    for name in ("vocab_size", "num_experts", "topk", "hidden_size", "num_heads",
                 "ffn_hidden_size", "max_seq_length"):
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            raise UserError(f"Grouter config {name}={value!r} must be a positive integer")
    if not _is_int(config.num_layers) or config.num_layers < 0:
        raise UserError(f"Grouter config num_layers={config.num_layers!r} must be an integer >= 0")
    for name in ("use_positions", "score_bias", "causal"):
        if not isinstance(getattr(config, name), bool):
            raise UserError(f"Grouter config {name}={getattr(config, name)!r} must be true or false")
    for name in ("rope_base", "norm_eps", "scaling_factor"):
        value = getattr(config, name)
        if not _is_number(value) or value <= 0:
            raise UserError(f"Grouter config {name}={value!r} must be a positive finite number")
    if config.expert_groups is not None:
        groups = config.expert_groups
        if (len(groups) != config.num_experts or not all(_is_int(g) and g >= 0 for g in groups)
                or set(groups) != set(range(max(groups) + 1))):
            raise UserError(f"Grouter config expert_groups must give each of the {config.num_experts} experts "
                            "a group id, using every id 0..G-1; re-save the Grouter")
        if config.topk > config.num_groups:
            raise UserError(f"Grouter config topk={config.topk} exceeds its {config.num_groups} expert groups; "
                            "choose topk <= the number of groups")
    if config.topk > config.num_experts:
        raise UserError(f"Grouter config topk={config.topk} exceeds num_experts={config.num_experts}; "
                        "choose topk <= num_experts")
    if config.encoder not in ENCODERS:
        raise UserError(f"Grouter config encoder={config.encoder!r} is unknown; choose one of {list(ENCODERS)}")
    if config.score_function not in SCORE_FUNCTIONS:
        raise UserError(f"Grouter config score_function={config.score_function!r} is unknown; "
                        f"choose one of {list(SCORE_FUNCTIONS)}")
    if config.dtype not in DTYPES:
        raise UserError(f"Grouter config dtype={config.dtype!r} is unknown; choose one of {list(DTYPES)}")
    if config.encoder == "mha":
        if config.hidden_size % config.num_heads:
            raise UserError(f"Grouter hidden_size={config.hidden_size} is not divisible by "
                            f"num_heads={config.num_heads}; pick a head count that divides it")
        if config.use_positions and config.head_dim % 2:
            raise UserError(f"Grouter head size {config.head_dim} is odd but RoPE needs an even one; "
                            "change hidden_size/num_heads or set use_positions=false")
