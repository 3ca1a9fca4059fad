"""Loading a checkpoint's safetensors into a model, each rank reading only its own slices."""
from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from torch import nn

from common.errors import ModelNotFoundError


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
