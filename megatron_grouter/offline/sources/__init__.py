"""Teacher sources for Grouter distillation: raw router logits of one MoE layer of a source model.

`HFPartialSource` is imported lazily so that code needing only the `TeacherSource` interface does
not pay for importing transformers.
"""

from megatron_grouter.offline.sources.base import TeacherSource

__all__ = ["HFPartialSource", "TeacherSource"]


def __getattr__(name: str):
    if name == "HFPartialSource":
        from megatron_grouter.offline.sources.hf_partial import HFPartialSource

        return HFPartialSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
