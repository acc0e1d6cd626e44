"""gloo twins of process groups, for collectives over host data that must not touch the GPU.

A count exchange or a preemption flag is a few integers that live on the host. Reduced over an
NCCL group they would make a round trip through the GPU, queued behind the step's kernels: the
host waits for the whole step (a device→host sync). Over a gloo group with the same ranks the
host exchanges them directly while the GPU keeps running. Under gloo (CPU runs) a group is its
own twin.
"""

from __future__ import annotations

import torch.distributed as dist

_TWINS: dict[tuple[int, ...], object] = {}


def host_twin(group=None):
    """A gloo group with the ranks of `group` (None: the whole world). Collective on first use
    for a kind of group: every rank calls it, with its own group of that kind, at the same point."""
    if not dist.is_initialized():
        return None
    if dist.get_backend(group) == "gloo":
        return group
    ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(range(dist.get_world_size()))
    if ranks not in _TWINS:
        # new_group is collective over the world: every rank creates every twin of this kind
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, ranks)
        for member_ranks in sorted(set(everyone)):
            twin = dist.new_group(list(member_ranks), backend="gloo")
            if member_ranks == ranks:
                _TWINS[ranks] = twin
    return _TWINS[ranks]
