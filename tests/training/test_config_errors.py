"""Bad configs fail up front with one line that names the problem; no traceback."""

import subprocess
import sys

import pytest

from megatron_grouter.errors import UserError
from megatron_grouter.training.config import to_train_config, validate
from tests.train_runs import REPO, compose


def config(*overrides):
    return to_train_config(compose(list(overrides)))


def test_top1_with_pre_softmax_builds_megatrons_config():
    from megatron_grouter.training.model import transformer_config

    for router in ("aux_loss", "probmoe_exact_k", "grouter_fixed"):
        root = config("model.topk=1", f"router={router}", "router.pre_softmax=true")
        validate(root, world_size=1)
        assert transformer_config(root.model, root.router, root.parallel).moe_router_topk == 1


@pytest.mark.parametrize("overrides, world, needle", [
    (["model.topk=20"], 1, "model.topk=20"),
    (["parallel.expert=3"], 3, "not divisible by parallel.expert=3"),
    (["parallel.expert=2"], 3, "world size 3"),
    (["train.seq_length=4096"], 1, "max_position_embeddings"),
    (["model.hidden_size=130"], 1, "num_attention_heads"),
    (["train.global_batch_size=12"], 1, "global_batch_size=12"),
    (["router.load_balancing_type=magic"], 1, "load_balancing_type"),
    (["model.first_dense_layers=4"], 1, "first_dense_layers"),
    # step machinery: what megatron-core cannot run as given is refused, never run wrong
    (["parallel.tensor=2"], 2, "set parallel.sequence_parallel=true"),
    (["parallel.tensor=3", "parallel.sequence_parallel=true"], 3, "model.num_attention_heads=4 does not split"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2"], 2, "ETP×EP×PP=4"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=2",
      "parallel.dispatcher=planned"], 4, "parallel.expert_tensor=1 or use"),
    (["parallel.expert=3", "parallel.expert_tensor=3", "model.num_experts=6", "parallel.tensor=3",
      "parallel.sequence_parallel=true", "model.num_attention_heads=3", "model.hidden_size=96",
      "model.ffn_hidden_size=96"], 9, "model.moe_ffn_hidden_size=128 does not split"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert_tensor=1"], 2,
     "supports only with expert parallelism"),
    (["parallel.pipeline=3"], 3, "model.num_layers=4"),
    (["parallel.virtual_pipeline=2"], 1, "parallel.virtual_pipeline=2"),
    (["parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.micro_batch_size=16"], 2,
     "divisible by parallel.pipeline=2"),
    (["parallel.pipeline=2", "model.first_dense_layers=2"], 2, "without an MoE layer"),
    (["parallel.overlap_grad_reduce=true"], 1, "CUDA streams"),
    (["train.bf16=true", "train.fp32_main_params=false"], 1, "fp32_main_params=false"),
    (["train.recompute=sometimes"], 1, "train.recompute='sometimes'"),
    (["router=grouter_fixed", "train.recompute=full"], 1, "train.recompute=full"),
    (["model.topk=1"], 1, "router.pre_softmax=true"),
    (["model.topk=1", "router=probmoe_exact_k"], 1, "router.pre_softmax=true"),
])
def test_validation_errors_are_one_line(overrides, world, needle):
    with pytest.raises(UserError) as error:
        validate(config(*overrides), world_size=world)
    assert needle in str(error.value)
    assert "\n" not in str(error.value)


def test_grouped_gemm_refused_without_transformer_engine():
    from megatron_grouter.training.model import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("Transformer Engine is present: grouped GEMM runs here")
    with pytest.raises(UserError, match="model.grouped_gemm=true needs Transformer Engine") as error:
        validate(config("model.grouped_gemm=true"), world_size=1)
    assert "\n" not in str(error.value)


def test_tokenizer_larger_than_model_vocab():
    with pytest.raises(UserError, match="tokenizer has 5000 tokens"):
        validate(config("model.vocab_size=4096"), world_size=1, tokenizer_vocab=5000)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_grouter.train", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_one_line_error_and_exit_code_2():
    result = run_cli("model.topk=99")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: model.topk=99")
    assert "Traceback" not in result.stderr


def test_cli_prints_composed_config():
    result = run_cli("--cfg", "job", "router=seq_aux_loss", "parallel=ep2")
    assert result.returncode == 0
    assert "load_balancing_type: seq_aux_loss" in result.stdout
    assert "expert: 2" in result.stdout


def test_wrong_type_is_reported_without_traceback():
    result = run_cli("model.num_layers=many")
    assert result.returncode != 0
    assert "model.num_layers" in result.stderr and "could not be converted to Integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_router_type_is_one_line():
    with pytest.raises(UserError, match="router.type='magic' is unknown"):
        validate(config("router.type=magic"), world_size=1)
