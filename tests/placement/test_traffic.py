"""EP traffic counts of a rank's tokens, on cases small enough to check by hand."""

import numpy as np

from megatron_grouter.placement.traffic import token_traffic


def test_two_ranks_one_per_node():
    # experts 0,1 on rank 0 and 2,3 on rank 1; the tokens are trained on rank 0
    tokens = np.array([[0, 1], [0, 2], [2, 3]])
    counts = token_traffic(tokens, np.array([0, 0, 1, 1]), rank=0, ranks_per_node=1)
    # [0,1] stays; [0,2] sends one pair, once; [2,3] sends two pairs but the token only once
    assert counts == {"tokens": 3, "pairs_leaving_rank": 3, "pairs_leaving_node": 3, "sends_rank": 2, "sends_node": 2}


def test_four_ranks_two_per_node():
    # expert e on rank e; ranks 0,1 form node 0 and ranks 2,3 node 1; tokens trained on rank 0
    tokens = np.array([[0, 1], [2, 3], [1, 3]])
    counts = token_traffic(tokens, np.arange(4), rank=0, ranks_per_node=2)
    # rank level: 1 + 2 + 2 pairs, each to a distinct rank; node level: [0,1] stays in node 0,
    # [2,3] sends two pairs to node 1 once, [1,3] sends one pair (expert 3) to node 1
    assert counts == {"tokens": 3, "pairs_leaving_rank": 5, "sends_rank": 5, "pairs_leaving_node": 3, "sends_node": 2}
