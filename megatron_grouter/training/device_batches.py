"""A step's micro-batches on the GPU before the step needs them.

`BatchUploader.upload` copies the tokens and the preemptive routing of every micro-batch from
page-locked host memory on a side stream, without blocking the host, and records an event; the
forward step makes the compute stream wait for that event (`on_device`), so neither the host
nor the GPU's compute waits for a copy issued early enough. The trainer uploads the next step's
micro-batches while the GPU still runs the current step. Without CUDA this is a plain `.to()`.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_grouter.training.batches import MicroBatch

_TENSOR_FIELDS = ("tokens_BS", "labels_BS", "loss_mask_BS", "position_ids_BS", "sample_ids_B")


def _pinned(batch: MicroBatch) -> MicroBatch:
    routing = None if batch.routing is None else batch.routing.pin_memory()
    return dataclasses.replace(batch, routing=routing,
                               **{name: getattr(batch, name).pin_memory() for name in _TENSOR_FIELDS})


def _device_tensors(batch: MicroBatch) -> list[torch.Tensor]:
    tensors = [getattr(batch, name) for name in _TENSOR_FIELDS]
    if batch.routing is not None:
        tokens = batch.routing.tokens_SBK
        tensors += [tokens.slots, tokens.weights, tokens.routed]
    return tensors


class BatchUploader:
    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def upload(self, batches: list[MicroBatch]) -> list[MicroBatch]:
        """Device copies of `batches` (host routing kept as `host_routing` for observers)."""
        if self.stream is None:
            return [dataclasses.replace(batch.to(self.device), host_routing=batch.routing) for batch in batches]
        pinned = [_pinned(batch) for batch in batches]
        # No wait on the compute stream: the copies read only host memory, and device memory the
        # compute stream used is not reused before that use completes (record_stream in on_device).
        with torch.cuda.stream(self.stream):
            uploaded = [dataclasses.replace(batch.to(self.device), host_routing=host.routing)
                        for batch, host in zip(pinned, batches)]
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return [dataclasses.replace(batch, ready=ready) for batch in uploaded]


def on_device(batch: MicroBatch, device: torch.device) -> MicroBatch:
    """The batch, usable on the current stream: wait (on the GPU) for its upload, and tell the
    caching allocator that the compute stream uses memory allocated on the side stream."""
    if batch.ready is None:
        return batch.to(device)
    stream = torch.cuda.current_stream(device)
    stream.wait_event(batch.ready)
    for tensor in _device_tensors(batch):
        tensor.record_stream(stream)
    return batch
