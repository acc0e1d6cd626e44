"""Where preemptive routing comes from: a source maps a micro-batch to its tokens' top-k.

`topk_for(batch)` returns batch-first [b, s, k] source-expert ids and gate weights: on the host
(cache, hash table: `on_host`), or on the device (the online Grouter).
Sources: the frozen Grouter run online, the routing cache written offline, a token-id hash
table. `routing/provider.py` turns them into each micro-batch's routing.
"""

from __future__ import annotations

from typing import Protocol

import torch


class RoutingSource(Protocol):
    def topk_for(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, s, k] expert ids and weights for every token of `batch` (a training MicroBatch)."""


class HashTableSource:
    """Each token id always goes to the same k experts: table_VK[token] (the hash-layer baseline).

    Gate weights are uniform here; the hybrid router replaces them with its trainable gate.
    """

    on_host = True

    def __init__(self, table_VK: torch.Tensor):
        self.table_VK = table_VK.long()

    def topk_for(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        indices_BSK = self.table_VK[batch.tokens_BS]  # the host batch: routed before upload
        return indices_BSK, torch.full(indices_BSK.shape, 1.0 / indices_BSK.shape[-1])


class OnlineGrouterSource:
    """The frozen Grouter, run on the document windows of each micro-batch (no grad)."""

    def __init__(self, online_routing):
        self.online_routing = online_routing

    def topk_for(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """On the Grouter's device (no device→host sync; a planned dispatcher's count exchange or
        an observer reads them to the host)."""
        return self.online_routing.route_positions(batch.token_positions_BS)


class CachedRoutingSource:
    """Rows of the routing cache for each token of the micro-batch."""

    on_host = True

    def __init__(self, cache):
        self.cache = cache

    def topk_for(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        positions_BS = batch.token_positions_BS.clip(min=0)  # padding: routed like position 0
        return self.cache.rows(positions_BS)
