"""Balanced hash layer baseline: the table balances the corpus; the hybrid gate learns on it."""

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_grouter.data.lm_split import split_ranges
from megatron_grouter.routing.hash_table import balanced_hash_table, expert_loads, token_frequencies
from tests.train_runs import MICRO_MODEL, data_overrides, read_metrics, train_in_process, val_losses


def test_hash_table_balances_default_corpus_within_5_percent(stdlib_data):
    counts_V = token_frequencies(stdlib_data["prefix"], 4096, "96,2,2")
    for experts, topk in ((16, 2), (64, 8)):
        table_VK = balanced_hash_table(counts_V, experts, topk, seed=0)
        assert all(len(set(row)) == topk for row in table_VK[:500])  # distinct experts per token
        loads = expert_loads(table_VK, counts_V, experts)
        assert loads.sum() == counts_V.sum() * topk
        imbalance = loads.max() / loads.mean() - 1
        print(f"hash table E={experts} k={topk}: max/mean - 1 = {imbalance:.4f}")
        assert imbalance < 0.05
    # A naive modulo table is far less balanced on the same corpus.
    naive = np.stack([np.arange(4096) % 16, (np.arange(4096) + 1) % 16], axis=1)
    naive_loads = expert_loads(naive, counts_V, 16)
    assert naive_loads.max() / naive_loads.mean() - 1 > 0.05


def test_hash_counts_read_only_the_lm_train_documents(stdlib_data):
    """The table's token counts never see the LM's validation or test documents."""
    index = IndexedDataset(stdlib_data["prefix"]).index
    tokens = np.memmap(stdlib_data["prefix"] + ".bin", dtype=index.dtype, mode="r")
    ranges = split_ranges(len(index.sequence_lengths), "80,10,10")
    first_held_out = ranges["valid"][0]
    assert 0 < first_held_out < len(index.sequence_lengths)
    end_of_train = int(index.sequence_pointers[first_held_out]) // index.dtype_size
    expected = np.bincount(tokens[:end_of_train], minlength=4096)[:4096]
    assert (token_frequencies(stdlib_data["prefix"], 4096, "80,10,10") == expected).all()
    everything = token_frequencies(stdlib_data["prefix"], 4096, None)
    assert everything.sum() == len(tokens) > expected.sum()


def test_hash_router_trains_its_gate(stdlib_data, tmp_path):
    train_in_process([*data_overrides(stdlib_data), *MICRO_MODEL, "router=hash", "train.steps=60",
                      "train.warmup_steps=5", "train.eval_interval=30", "train.eval_iters=1",
                      "train.save_interval=-1", f"train.out_dir={tmp_path}"])
    val = val_losses(tmp_path)
    assert val[60] < val[0] - 1.0
    steps = [record for record in read_metrics(tmp_path) if "loss" in record]
    # Fixed table: every step routes the same tokens the same way, so load stays balanced,
    # while the trainable gate's entropy changes as it learns.
    assert max(record["moe/max_vio"] for record in steps) < 1.0
    assert steps[0]["moe/gate_entropy"] != steps[-1]["moe/gate_entropy"]
    assert "moe/load_balancing_loss" not in steps[0]
