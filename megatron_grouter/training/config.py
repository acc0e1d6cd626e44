"""Structured configs of the train app, and their validation.

Hydra composes YAML from conf/; `to_train_config` merges it onto these dataclasses (types are
checked by OmegaConf) and `validate` checks what types cannot, each failure one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megatron_grouter.errors import UserError


@dataclass
class ModelConfig:
    name: str = "tiny_cpu"
    num_layers: int = 4
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA key/value groups; None: one per head
    kv_channels: Optional[int] = None  # head dimension; None: hidden_size / num_attention_heads
    ffn_hidden_size: int = 512
    num_experts: int = 16
    moe_ffn_hidden_size: int = 128
    topk: int = 2
    first_dense_layers: int = 0
    shared_expert_intermediate_size: Optional[int] = None
    vocab_size: Optional[int] = None  # None: the tokenizer's, padded to a multiple of 128
    max_position_embeddings: int = 4096
    rotary_base: int = 10000
    untie_embeddings: bool = True
    qk_layernorm: bool = False
    multi_latent_attention: bool = False
    kv_lora_rank: int = 512
    q_lora_rank: Optional[int] = None
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # Experts as one grouped GEMM (Transformer Engine's TEGroupedMLP) instead of a per-expert loop;
    # None: on where it runs (CUDA with Transformer Engine), the loop elsewhere.
    grouped_gemm: Optional[bool] = None


@dataclass
class GrouterRoutingConfig:
    path: Optional[str] = None  # a Grouter checkpoint directory
    source: str = "online"  # online: run the frozen Grouter per micro-batch | cached: routing cache
    cache: Optional[str] = None  # routing cache directory (source=cached)
    scaling_factor: float = 1.0
    activation_threshold: Optional[float] = None  # dynamic activation (off by default)
    plan: Optional[str] = None  # an EP placement plan from mg-plan-ep (expert slots + sample schedule)
    # A bidirectional Grouter (causal=false) lets future tokens steer a causal LM's experts;
    # mg-train refuses it unless this is true, and then labels the run "sees future tokens".
    allow_future_context: bool = False
    # router.type=grouter_warm: training tokens (per rank) routed by the Grouter before the router's
    # own top-k takes over, and the weight of its imitation loss meanwhile (routing/warm_router.py)
    warm_tokens: int = 0
    imitation_coeff: float = 1.0


@dataclass
class HashRoutingConfig:
    table: Optional[str] = None  # a hash table file; None: build one from the training data


@dataclass
class ProbMoERoutingConfig:
    k_min: Optional[int] = None  # None: exact-k (k_min = model.topk); else dynamic-k in [k_min, topk]
    inference_rule: str = "map"  # map (most probable subset) | official | top_p
    temperature: float = 1.0  # selection distribution exp(z . logits / temperature); gates keep softmax(logits)
    count_cost: float = 0.0  # dynamic-k: loss coefficient on E|z|, the expected active experts (0: none, as the paper)


@dataclass
class RouterConfig:
    name: str = "aux_loss"
    type: str = "topk"  # topk (megatron's TopKRouter)
    load_balancing_type: str = "aux_loss"  # aux_loss | seq_aux_loss | sinkhorn | none
    aux_loss_coeff: float = 0.01
    z_loss_coeff: Optional[float] = None
    enable_expert_bias: bool = False
    bias_update_rate: float = 1e-3
    score_function: str = "softmax"
    pre_softmax: bool = False
    topk_scaling_factor: Optional[float] = None
    grouter: GrouterRoutingConfig = field(default_factory=GrouterRoutingConfig)
    hash: HashRoutingConfig = field(default_factory=HashRoutingConfig)
    probmoe: ProbMoERoutingConfig = field(default_factory=ProbMoERoutingConfig)


@dataclass
class DataConfig:
    corpus: str = "stdlib"  # "stdlib", a file (text/.jsonl/.json[.gz|.zst]/.parquet/.arrow), a directory, a glob
    text_field: str = "text"  # the records' text field (JSON lines, parquet, arrow, datasets)
    suffixes: Optional[str] = None  # in directories, read only these suffixes (".pm,.pl"); None: every file
    out_dir: str = "data/stdlib"
    prefix: Optional[str] = None  # an existing indexed dataset prefix; None: preprocess `corpus`
    tokenizer: Optional[str] = None  # tokenizer dir / tokenizer.json; None: train a BPE
    vocab_size: int = 4096
    max_documents: Optional[int] = None
    split: str = "96,2,2"
    eval_split: str = "valid"  # the documents validation loss is measured on: valid | test
    num_workers: int = 0


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1  # pipeline stages (megatron's 1F1B schedule when > 1)
    virtual_pipeline: Optional[int] = None  # model chunks per stage: the interleaved 1F1B schedule
    expert: int = 1
    # Expert tensor parallelism (megatron's expert_tensor_parallel_size): each expert's weights
    # split over this many ranks. None: parallel.tensor, as Megatron-LM defaults it; 1 keeps whole
    # experts and runs the TP ranks as extra EP/expert-DP ranks (what the planned dispatcher needs).
    expert_tensor: Optional[int] = None
    sequence_parallel: bool = False  # required (and refused without) when parallel.tensor > 1
    dispatcher: str = "allgather"  # allgather | alltoall (CUDA) | planned (dispatch/)
    verify_dispatch_plan: bool = False  # planned: check the plan against each layer's routing
    ranks_per_node: int = 8  # EP ranks per node, for the ep/*_node traffic metrics
    distributed_optimizer: bool = False  # shard fp32 main params + Adam state over DP (ZeRO-1)
    overlap_grad_reduce: bool = False  # CUDA: reduce grad buckets during backward
    overlap_param_gather: bool = False  # CUDA, distributed optimizer: gather params during forward


@dataclass
class TrainConfig:
    seed: int = 1234
    seq_length: int = 128
    micro_batch_size: int = 8
    global_batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    eval_interval: int = 50
    eval_iters: int = 4
    log_interval: int = 10
    save_interval: int = 0  # 0: only at the end
    out_dir: str = "outputs/run"
    resume: str = "auto"  # auto | none | <checkpoint dir>
    bf16: bool = False  # bf16 params and activations (megatron's mixed-precision optimizer)
    fp32_main_params: bool = True  # with bf16: fp32 master weights and Adam moments
    recompute: str = "none"  # none | selective (core attention) | full (every layer)
    max_steps_this_run: Optional[int] = None  # stop early (keeps the schedule of `steps`)
    device: str = "auto"  # auto (CUDA when present, else CPU) | cuda (refuse to start without a GPU)


@dataclass
class LoggerConfig:
    console: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_mode: str = "offline"
    wandb_project: str = "megatron-grouter"


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_schema() -> None:
    """Make RootConfig the base of conf/config.yaml: every field can be overridden and is typed."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="train_schema", node=RootConfig)


LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "sinkhorn", "none")
DISPATCHERS = ("allgather", "alltoall", "planned")
RECOMPUTE = ("none", "selective", "full")


def validate_step_machinery(root: "RootConfig", num_microbatches: int) -> None:
    """The pipeline, optimizer and recomputation settings megatron-core can run as given."""
    import torch

    model, parallel, train = root.model, root.parallel, root.train
    cuda = torch.cuda.is_available()
    chunks = parallel.virtual_pipeline or 1
    if parallel.virtual_pipeline is not None:
        if parallel.pipeline < 2 or parallel.virtual_pipeline < 2:
            raise UserError(f"parallel.virtual_pipeline={parallel.virtual_pipeline} interleaves "
                            "≥ 2 model chunks over ≥ 2 stages; set parallel.pipeline ≥ 2 and "
                            "virtual_pipeline ≥ 2, or virtual_pipeline=null")
        if num_microbatches % parallel.pipeline:
            raise UserError(f"the interleaved schedule needs micro-batches per step "
                            f"({num_microbatches}) divisible by parallel.pipeline={parallel.pipeline}; "
                            "change train.global_batch_size or train.micro_batch_size")
    if model.num_layers % (parallel.pipeline * chunks):
        raise UserError(f"model.num_layers={model.num_layers} does not split into "
                        f"parallel.pipeline×virtual_pipeline={parallel.pipeline * chunks} equal "
                        "chunks; change the layer count or the pipeline sizes")
    layers_per_chunk = model.num_layers // (parallel.pipeline * chunks)
    if parallel.pipeline > 1 and model.first_dense_layers >= layers_per_chunk:
        raise UserError(f"model.first_dense_layers={model.first_dense_layers} leaves the first "
                        f"pipeline chunk ({layers_per_chunk} layers) without an MoE layer; use fewer "
                        "dense layers or fewer pipeline stages")
    if (parallel.overlap_grad_reduce or parallel.overlap_param_gather) and not cuda:
        raise UserError("parallel.overlap_grad_reduce / overlap_param_gather overlap communication "
                        "on CUDA streams; without CUDA set them to false")
    if parallel.overlap_param_gather and not (parallel.distributed_optimizer
                                              and parallel.overlap_grad_reduce):
        raise UserError("parallel.overlap_param_gather needs parallel.distributed_optimizer=true and "
                        "parallel.overlap_grad_reduce=true")
    if train.bf16 and not train.fp32_main_params:
        raise UserError("train.fp32_main_params=false (bf16 master weights) needs Transformer "
                        "Engine's precision-aware FusedAdam, which this build does not wire; keep "
                        "train.fp32_main_params=true with train.bf16")
    if train.recompute not in RECOMPUTE:
        raise UserError(f"train.recompute={train.recompute!r} is unknown; choose one of "
                        f"{', '.join(RECOMPUTE)}")
    from megatron_grouter.routing.registry import router_kind

    if train.recompute == "full" and router_kind(root.router.type).preemptive:
        raise UserError(f"train.recompute=full re-runs each layer in backward, after the routing "
                        f"of its micro-batch is gone; router={root.router.name} routes preemptively: "
                        "use train.recompute=selective or none")


def expert_tensor_size(parallel: ParallelConfig) -> int:
    """The expert tensor parallel size: parallel.expert_tensor, or parallel.tensor when unset
    (Megatron-LM's default for --expert-tensor-parallel-size)."""
    return parallel.tensor if parallel.expert_tensor is None else parallel.expert_tensor


def validate_tensor_parallel(model: ModelConfig, parallel: ParallelConfig) -> None:
    """Tensor and expert-tensor parallel sizes megatron-core can build and run as given."""
    tensor, expert_tensor = parallel.tensor, expert_tensor_size(parallel)
    if tensor > 1 and not parallel.sequence_parallel:
        raise UserError(f"parallel.tensor={tensor} with MoE layers needs sequence parallelism (megatron-core "
                        "refuses it at the first forward otherwise); set parallel.sequence_parallel=true")
    if expert_tensor != tensor and parallel.expert == 1:
        raise UserError(f"parallel.expert_tensor={expert_tensor} differs from parallel.tensor={tensor}, which "
                        "megatron-core supports only with expert parallelism (with one EP rank it reduces expert "
                        "gradients as dense ones, never across the TP ranks); set parallel.expert ≥ 2 or "
                        "parallel.expert_tensor to parallel.tensor")
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    for name, value, knob, size in (
            ("model.num_attention_heads", heads, "parallel.tensor", tensor),
            ("model.num_query_groups", groups, "parallel.tensor", tensor),
            ("model.ffn_hidden_size", model.ffn_hidden_size, "parallel.tensor", tensor),
            ("model.shared_expert_intermediate_size", model.shared_expert_intermediate_size,
             "parallel.tensor", tensor),
            ("model.moe_ffn_hidden_size", model.moe_ffn_hidden_size, "parallel.expert_tensor", expert_tensor)):
        if value is not None and value % size:
            raise UserError(f"{name}={value} does not split over {knob}={size}; choose sizes that divide it")
    if model.grouped_gemm:
        from megatron_grouter.training.model import transformer_engine_available

        if not transformer_engine_available():
            raise UserError("model.grouped_gemm=true needs Transformer Engine's grouped GEMM (CUDA + "
                            "transformer_engine); without it set model.grouped_gemm=false or leave it null")


def validate_dispatcher(parallel: ParallelConfig) -> None:
    if parallel.dispatcher not in DISPATCHERS:
        raise UserError(f"parallel.dispatcher={parallel.dispatcher!r} is unknown; choose one of "
                        f"{', '.join(DISPATCHERS)}")
    if parallel.dispatcher == "planned":
        if parallel.expert < 2:
            raise UserError("parallel.dispatcher=planned needs expert parallelism (parallel.expert "
                            "≥ 2); with one EP rank use parallel.dispatcher=allgather")
        if expert_tensor_size(parallel) > 1:
            raise UserError(f"parallel.dispatcher=planned keeps experts whole (expert tensor parallel size 1) "
                            f"but parallel.expert_tensor is {expert_tensor_size(parallel)}; set "
                            "parallel.expert_tensor=1 or use parallel.dispatcher=alltoall")
    elif parallel.verify_dispatch_plan:
        raise UserError("parallel.verify_dispatch_plan checks the planned dispatcher; set "
                        "parallel.dispatcher=planned or drop it")


def to_train_config(cfg: DictConfig | dict) -> RootConfig:
    """Merge a composed config onto the schema; a type error becomes a one-line UserError."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    container = {key: value for key, value in container.items() if key != "hydra"}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RootConfig), container)
        root = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        first_line = str(error).splitlines()[0]
        raise UserError(f"invalid config: {first_line}") from None
    return root


_POSITIVE = ("> 0", lambda value: value > 0)
_NON_NEGATIVE = ("≥ 0", lambda value: value >= 0)
_FRACTION = ("in [0, 1)", lambda value: 0 <= value < 1)


def validate_numbers(root: RootConfig) -> None:
    """Numbers outside their meaningful range (train.lr=-0.001, a zero batch, NaN) would crash
    deep inside megatron or train silently wrong; refuse them in one line naming the field."""
    import math

    model, router, train, data, parallel = root.model, root.router, root.train, root.data, root.parallel
    checks = [
        ("train.lr", train.lr, _POSITIVE), ("train.min_lr", train.min_lr, _NON_NEGATIVE),
        ("train.weight_decay", train.weight_decay, _NON_NEGATIVE),
        ("train.adam_beta1", train.adam_beta1, _FRACTION), ("train.adam_beta2", train.adam_beta2, _FRACTION),
        ("train.clip_grad", train.clip_grad, _NON_NEGATIVE), ("train.seq_length", train.seq_length, _POSITIVE),
        ("train.micro_batch_size", train.micro_batch_size, _POSITIVE),
        ("train.global_batch_size", train.global_batch_size, _POSITIVE),
        ("train.eval_interval", train.eval_interval, _NON_NEGATIVE),
        ("train.eval_iters", train.eval_iters, _NON_NEGATIVE), ("train.log_interval", train.log_interval, _POSITIVE),
        ("train.max_steps_this_run", train.max_steps_this_run, _POSITIVE),
        ("model.num_layers", model.num_layers, _POSITIVE), ("model.hidden_size", model.hidden_size, _POSITIVE),
        ("model.num_attention_heads", model.num_attention_heads, _POSITIVE),
        ("model.ffn_hidden_size", model.ffn_hidden_size, _POSITIVE),
        ("model.num_experts", model.num_experts, _POSITIVE),
        ("model.moe_ffn_hidden_size", model.moe_ffn_hidden_size, _POSITIVE),
        ("model.vocab_size", model.vocab_size, _POSITIVE),
        ("model.max_position_embeddings", model.max_position_embeddings, _POSITIVE),
        ("model.rotary_base", model.rotary_base, _POSITIVE),
        ("model.init_method_std", model.init_method_std, _POSITIVE),
        ("model.attention_dropout", model.attention_dropout, _FRACTION),
        ("model.hidden_dropout", model.hidden_dropout, _FRACTION),
        ("model.first_dense_layers", model.first_dense_layers, _NON_NEGATIVE),
        ("router.aux_loss_coeff", router.aux_loss_coeff, _NON_NEGATIVE),
        ("router.z_loss_coeff", router.z_loss_coeff, _NON_NEGATIVE),
        ("router.bias_update_rate", router.bias_update_rate, _NON_NEGATIVE),
        ("router.grouter.scaling_factor", router.grouter.scaling_factor, _POSITIVE),
        ("data.vocab_size", data.vocab_size, _POSITIVE), ("data.max_documents", data.max_documents, _POSITIVE),
        ("data.num_workers", data.num_workers, _NON_NEGATIVE),
        ("parallel.tensor", parallel.tensor, _POSITIVE), ("parallel.pipeline", parallel.pipeline, _POSITIVE),
        ("parallel.expert", parallel.expert, _POSITIVE),
        ("parallel.expert_tensor", parallel.expert_tensor, _POSITIVE),
    ]
    for name, value, (rule, holds) in checks:
        if value is None:  # optional fields left unset
            continue
        if (isinstance(value, float) and not math.isfinite(value)) or not holds(value):
            raise UserError(f"{name}={value} must be {rule}; fix the value")


def validate(root: RootConfig, world_size: int, tokenizer_vocab: int | None = None) -> None:
    """Check what the types cannot; raise one UserError for the first problem found."""
    model, router, train, parallel = root.model, root.router, root.train, root.parallel
    validate_numbers(root)
    if model.topk < 1 or model.topk > model.num_experts:
        raise UserError(f"model.topk={model.topk} must be between 1 and model.num_experts="
                        f"{model.num_experts}")
    if (model.kv_channels is None and not model.multi_latent_attention
            and model.hidden_size % model.num_attention_heads):
        raise UserError(f"model.hidden_size={model.hidden_size} is not divisible by "
                        f"model.num_attention_heads={model.num_attention_heads}; change one or set "
                        "model.kv_channels")
    if model.multi_latent_attention:
        from megatron_grouter.training.model import transformer_engine_available

        if not transformer_engine_available():
            raise UserError("model.multi_latent_attention needs Transformer Engine (GPU); megatron-core's "
                            "local layer spec cannot build MLA: use a GPU image or a non-MLA preset")
    if model.first_dense_layers >= model.num_layers:
        raise UserError(f"model.first_dense_layers={model.first_dense_layers} leaves no MoE layer "
                        f"in {model.num_layers} layers")
    from megatron_grouter.routing.registry import router_kind

    # megatron's top-1 guard, on the fields the router kind really hands to TransformerConfig
    fields = router_kind(router.type).config_fields(router)
    if (model.topk == 1 and fields.get("moe_router_score_function", "softmax") == "softmax"
            and not fields.get("moe_router_pre_softmax", False)
            and fields.get("moe_router_load_balancing_type") != "sinkhorn"):
        raise UserError("model.topk=1 with softmax scores needs router.pre_softmax=true (renormalising one "
                        "chosen expert gives it weight 1.0 and the router no gradient); set it")
    if router.type == "topk" and router.load_balancing_type not in LOAD_BALANCING_TYPES:
        raise UserError(f"router.load_balancing_type={router.load_balancing_type!r} is unknown; "
                        f"choose one of {', '.join(LOAD_BALANCING_TYPES)}")
    if train.seq_length > model.max_position_embeddings:
        raise UserError(f"train.seq_length={train.seq_length} exceeds model.max_position_embeddings="
                        f"{model.max_position_embeddings}; shorten the sequence or raise the limit")
    if model.num_experts % parallel.expert:
        raise UserError(f"model.num_experts={model.num_experts} is not divisible by parallel.expert="
                        f"{parallel.expert}")
    validate_tensor_parallel(model, parallel)
    model_parallel = parallel.tensor * parallel.pipeline
    expert_grid = expert_tensor_size(parallel) * parallel.expert * parallel.pipeline
    if world_size % model_parallel or world_size % expert_grid:
        raise UserError(f"world size {world_size} is not divisible by TP×PP={model_parallel} and "
                        f"ETP×EP×PP={expert_grid}; change parallel.* or the process count")
    data_parallel = world_size // model_parallel
    if train.global_batch_size % (train.micro_batch_size * data_parallel):
        raise UserError(f"train.global_batch_size={train.global_batch_size} is not divisible by "
                        f"micro_batch_size×data_parallel={train.micro_batch_size * data_parallel}")
    validate_dispatcher(parallel)
    validate_step_machinery(root, train.global_batch_size // (train.micro_batch_size * data_parallel))
    if parallel.sequence_parallel and parallel.tensor == 1:
        raise UserError("parallel.sequence_parallel needs parallel.tensor > 1")
    if tokenizer_vocab is not None and model.vocab_size is not None and tokenizer_vocab > model.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer_vocab} tokens but model.vocab_size="
                        f"{model.vocab_size}; raise model.vocab_size or leave it null")
    if train.steps < 1 or train.warmup_steps < 0:
        raise UserError(f"train.steps={train.steps} must be ≥ 1 and train.warmup_steps="
                        f"{train.warmup_steps} ≥ 0")
    if train.resume not in ("auto", "none") and not train.resume:
        raise UserError("train.resume must be auto, none or a checkpoint directory")
