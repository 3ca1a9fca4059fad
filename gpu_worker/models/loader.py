"""Loading a checkpoint's safetensors into a model, each rank reading only its own slices."""
from __future__ import annotations

import logging
from pathlib import Path

from safetensors import safe_open
from torch import nn

from common.errors import ModelNotFoundError

log = logging.getLogger(__name__)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Fill every parameter of ``model`` from ``model_dir/*.safetensors``; errors name what is missing."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"{model_dir} has no *.safetensors weights")
    params = dict(model.named_parameters(remove_duplicate=False))
    unloaded = set(params)
    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():
                target = model.checkpoint_target(name)
                if target is None:
                    continue
                param_name, shard_id = target
                param = params.get(param_name)
                if param is None:
                    raise ModelNotFoundError(f"{file.name} holds {name!r}, which this model has no place for "
                                             "(is the architecture in config.json right?)")
                loader = getattr(param, "weight_loader", None)
                if loader is None:
                    param.data.copy_(reader.get_tensor(name))
                else:
                    loader(param, reader.get_slice(name), shard_id)
                unloaded.discard(param_name)
    tied = {n for n in unloaded if n == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)}
    missing = sorted(unloaded - tied)
    if missing:
        raise ModelNotFoundError(f"checkpoint in {model_dir} lacks {len(missing)} tensors, e.g. {missing[:3]}")


def load_quantized_blocks(model: nn.Module, model_dir: Path) -> int:
    """Hand every linear layer this rank's slice of its 4-bit GGUF blocks (``quantization="q4"``); how many took them.

    Reads the GGUF file the model store keeps beside the checkpoint
    (:func:`gpu_worker.weights.model_store.gguf_file`). Tensors stored in
    other types, and slices that do not fall on whole blocks, stay with the
    weights :func:`load_weights` loaded.
    """
    from gpu_worker.layers.linear import LinearBase
    from gpu_worker.weights.gguf_q4 import Q4_TYPES, read_blocks
    from gpu_worker.weights.model_store import gguf_file

    path = gguf_file(Path(model_dir))
    if path is None:
        raise ModelNotFoundError(f"quantization='q4' runs a GGUF file's 4-bit weights, and {model_dir} has none: "
                                 "use a registered model or a .gguf file (the model store keeps it as model.gguf)")
    blocks = read_blocks(path, types=Q4_TYPES)
    modules = dict(model.named_modules())
    taken = 0
    for name, tensor in blocks.tensors.items():
        target = model.checkpoint_target(name)
        if target is None:
            continue
        param_name, shard_id = target
        layer = modules.get(param_name.rpartition(".")[0])
        if isinstance(layer, LinearBase) and param_name.endswith(".weight"):
            taken += layer.load_quantized(tensor, shard_id)
    if taken == 0:
        raise ModelNotFoundError(f"{path.name} holds no Q4_0/Q4_1 weights for this model's linear layers "
                                 f"({blocks.summary()}): quantization='q4' has nothing to run")
    log.info("q4: %d of %d GGUF tensors packed as 4-bit (%s)", taken, len(blocks.tensors), blocks.summary())
    return taken
