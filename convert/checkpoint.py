"""Reading a PyTorch OpenELM checkpoint into Apple's Hugging Face weight names.

Two layouts exist:
- Hugging Face (apple/OpenELM-*): config.json and model.safetensors, or
  pytorch_model.bin, either possibly sharded with an *.index.json.
- CoreNet: one pickled state dict (*.pt) with the same names minus the
  `transformer.` prefix and `classifier.weight` for an untied output layer;
  the model size comes from the training YAML or is named by the user.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from elm_mlx.errors import ElmError
from elm_mlx.files import read_safetensors
from elm_mlx.hub import looks_like_repo_id, snapshot
from elm_mlx.models import architecture
from elm_mlx.models.openelm import CORENET_SIZES, ModelArgs

from .torch_pickle import load_torch_state_dict


@dataclass
class Checkpoint:
    args: Any  # the architecture's ModelArgs
    weights: Dict[str, mx.array]  # Apple's HF names, as stored (dtype untouched)
    origin: str  # what it was read from, for the model card
    name: str  # e.g. "OpenELM-270M-Instruct"
    directory: Optional[Path]  # where tokenizer files may be found


def read_checkpoint(source: str, corenet_model: Optional[str] = None, corenet_config: Optional[Path] = None) -> Checkpoint:
    """A local directory, a local .pt/.bin file, or a Hugging Face repo id."""
    path = Path(source).expanduser()
    corenet = corenet_model or corenet_config
    if not path.exists():
        if corenet or not looks_like_repo_id(source):
            raise ElmError(f"source {source!r} does not exist")
        return _read_hf_dir(snapshot(source), origin=f"{source} (Hugging Face Hub)", name=source.split("/")[-1])
    if corenet:
        name = corenet_model or corenet_model_name(Path(corenet_config))
        args = ModelArgs.from_corenet_name(name)
        pt_file = path if path.is_file() else _single(path, "*.pt")
        weights = corenet_to_hf_names(load_torch_state_dict(pt_file))
        return Checkpoint(args, weights, origin=f"{pt_file.name} (CoreNet, {name})", name=name, directory=pt_file.parent)
    if path.is_file():
        if path.suffix == ".pt":
            raise ElmError(f"{path.name} looks like a CoreNet checkpoint: pass --corenet-model OpenELM-270M (or --corenet-config YAML)")
        path = path.parent
    return _read_hf_dir(path, origin=str(path), name=path.name)


def _single(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise ElmError(f"expected exactly one {pattern} in {directory}, found {len(found)}")
    return found[0]


def _read_hf_dir(directory: Path, origin: str, name: str) -> Checkpoint:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ElmError(f"{directory} has no config.json")
    try:
        config = json.loads(config_file.read_text())
        args = architecture(config.get("model_type", "openelm")).ModelArgs.from_dict(config)
    except json.JSONDecodeError as e:
        raise ElmError(f"{config_file} is not valid JSON ({e})") from None
    except ElmError as e:
        raise ElmError(f"{config_file}: {e}") from None
    weights: Dict[str, mx.array] = {}
    for file in weight_files(directory):
        weights.update(_read_weight_file(file))
    return Checkpoint(args, weights, origin=origin, name=name, directory=directory)


def weight_files(directory: Path) -> List[Path]:
    """The weight files of a Hugging Face layout directory, every shard accounted for."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ElmError(f"{index} is not a valid shard index ({e})") from None
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise ElmError(f"missing shard {missing[0]} (listed in {index_name})")
            return [directory / s for s in shards]
        if (directory / single).is_file():
            return [directory / single]
    raise ElmError(f"no weights in {directory}: expected model.safetensors or pytorch_model.bin (or their sharded forms)")


def _read_weight_file(file: Path) -> Dict[str, mx.array]:
    return read_safetensors(file) if file.suffix == ".safetensors" else load_torch_state_dict(file)


def corenet_to_hf_names(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    return {("lm_head.weight" if k == "classifier.weight" else f"transformer.{k}"): v for k, v in weights.items()}


def corenet_model_name(yaml_file: Path) -> str:
    """model.language_modeling.general_gpt.model_name from a CoreNet training YAML."""
    import yaml

    try:
        config = yaml.safe_load(Path(yaml_file).read_text())
        name = config["model"]["language_modeling"]["general_gpt"]["model_name"]
    except (OSError, yaml.YAMLError) as e:
        raise ElmError(f"cannot read CoreNet config {yaml_file}: {e}") from None
    except (KeyError, TypeError):
        raise ElmError(f"{yaml_file} has no model.language_modeling.general_gpt.model_name") from None
    if name not in CORENET_SIZES:
        raise ElmError(f"{yaml_file} names model {name!r}; supported: {', '.join(CORENET_SIZES)}")
    return name


def checked_weights(checkpoint: Checkpoint) -> Dict[str, mx.array]:
    """The checkpoint's weights, each name known and each shape as the config implies."""
    model = architecture(checkpoint.args.model_type).Model(checkpoint.args)  # lazy: nothing is allocated
    expected = {name: p.shape for name, p in tree_flatten(model.parameters())}
    weights = model.sanitize(checkpoint.weights)
    for name, value in weights.items():
        if name not in expected:
            raise ElmError(f"unknown weight name {name!r} in {checkpoint.origin}")
        if tuple(value.shape) != tuple(expected[name]):
            raise ElmError(f"{name} has shape {tuple(value.shape)} but the config implies {tuple(expected[name])}")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ElmError(f"{checkpoint.origin} lacks {len(missing)} weight(s), e.g. {missing[0]!r}")
    return weights
