"""The worker side of tpqueue: model, tensor-parallel layers, KV cache, scheduler and engine."""


def __getattr__(name: str):
    if name == "Engine":  # imported lazily: it brings in torch
        from gpu_worker.llm import Engine
        return Engine
    raise AttributeError(name)


__all__ = ["Engine"]
