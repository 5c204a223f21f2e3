"""Reading a PyTorch OpenELM checkpoint into Apple's Hugging Face weight names.

Two layouts exist:
- Hugging Face (apple/OpenELM-*): config.json and model.safetensors, or
  pytorch_model.bin, either possibly sharded with an *.index.json.
- CoreNet: one pickled state dict (*.pt) with the same names minus the
  `transformer.` prefix and `classifier.weight` for an untied output layer;
  the model size comes from the training YAML or is named by the user.

Every file read from a source directory must lie inside it (shard index
entries and symlinks included), and the small metadata files are read with
a size bound before they are parsed.
"""

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from elm_mlx.errors import ElmError
from elm_mlx.files import file_in_source, read_json_object, read_safetensors, read_small_file
from elm_mlx.hub import looks_like_repo_id, snapshot
from elm_mlx.models import architecture
from elm_mlx.models.openelm import CORENET_SIZES, ModelArgs

from .torch_pickle import load_torch_state_dict

MAX_CONFIG_BYTES = 16 << 20  # config.json of a real model is a few KB
MAX_INDEX_BYTES = 64 << 20  # a shard index lists each tensor once: about 100 KB for OpenELM-3B
MAX_SHARDS = 10_000
MAX_YAML_BYTES = 1 << 20  # CoreNet training YAMLs are a few KB
MAX_YAML_NODES = 100_000  # counted with aliases expanded: a "billion laughs" YAML stops here
MAX_YAML_DEPTH = 64
UNUSED_CLASSIFIER = "transformer.classifier.weight"


@dataclass
class Checkpoint:
    args: Any  # the architecture's ModelArgs
    weights: Dict[str, mx.array]  # Apple's HF names, as stored (dtype untouched)
    origin: str  # what it was read from, for the model card
    name: str  # e.g. "OpenELM-270M-Instruct"
    directory: Optional[Path]  # where tokenizer files may be found
    sources: List[Path] = field(default_factory=list)  # what was read: an output must never replace these


def read_checkpoint(source: str, corenet_model: Optional[str] = None, corenet_config: Optional[Path] = None) -> Checkpoint:
    """A local directory, a local .pt/.bin file, or a Hugging Face repo id."""
    path = Path(source).expanduser()
    corenet = corenet_model or corenet_config
    if not path.exists():
        if corenet or not looks_like_repo_id(source):
            raise ElmError(f"source {source!r} does not exist")
        return _read_hf_dir(snapshot(source), origin=f"{source} (Hugging Face Hub)", name=source.split("/")[-1])
    if corenet:
        return _read_corenet(path, corenet_model or corenet_model_name(Path(corenet_config)))
    if path.is_file():
        if path.suffix == ".pt":
            raise ElmError(f"{path.name} looks like a CoreNet checkpoint: pass --corenet-model OpenELM-270M (or --corenet-config YAML)")
        path = path.parent
    return _read_hf_dir(path, origin=str(path), name=path.name)


def _read_corenet(path: Path, name: str) -> Checkpoint:
    """CoreNet's .pt: its `classifier.weight`, when present, is the (untied) output head."""
    args = ModelArgs.from_corenet_name(name)
    pt_file = path if path.is_file() else _single(path, "*.pt")
    weights = corenet_to_hf_names(load_torch_state_dict(pt_file))
    if "lm_head.weight" in weights:
        args = dataclasses.replace(args, share_input_output_layers=False)
    origin = f"{pt_file.name} (CoreNet, {name})"
    return Checkpoint(args, weights, origin=origin, name=name, directory=pt_file.parent, sources=[pt_file])


def _single(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    if len(found) != 1:
        raise ElmError(f"expected exactly one {pattern} in {directory}, found {len(found)}")
    return file_in_source(directory, found[0].name, "checkpoint")


def _read_hf_dir(directory: Path, origin: str, name: str) -> Checkpoint:
    config_file = file_in_source(directory, "config.json")
    if not config_file.is_file():
        raise ElmError(f"{directory} has no config.json")
    config = read_json_object(config_file, MAX_CONFIG_BYTES, "config")
    weights: Dict[str, mx.array] = {}
    for file in weight_files(directory):
        weights.update(_read_weight_file(file))
    model_type = config.get("model_type", "openelm")
    if model_type == "openelm":
        config, weights = apple_output_head(config, weights)
    try:
        args = architecture(model_type).ModelArgs.from_dict(config)
    except ElmError as e:
        raise ElmError(f"{config_file}: {e}") from None
    except (TypeError, ValueError) as e:  # a field of the wrong type that validation did not name
        raise ElmError(f"{config_file}: invalid config ({e})") from None
    return Checkpoint(args, weights, origin=origin, name=name, directory=directory, sources=[directory])


def apple_output_head(config: dict, weights: Dict[str, mx.array]) -> tuple:
    """Settle the output head exactly as Apple's OpenELMForCausalLM does under transformers.

    Its lm_head is None (logits from the embeddings) when share_input_output_layers
    is true, which OpenELMConfig defaults to false. Otherwise transformers ties
    lm_head to the embeddings whenever tie_word_embeddings is true, its default
    (OpenELMConfig does not pass the field, so PretrainedConfig's True stands).
    The returned config says which the model does; the weights lose the
    `transformer.classifier.weight` that OpenELMModel creates but never uses.
    """
    share = _flag(config, "share_input_output_layers", False)
    tie = _flag(config, "tie_word_embeddings", True)
    tied = share or tie
    weights = dict(weights)
    if UNUSED_CLASSIFIER in weights:
        del weights[UNUSED_CLASSIFIER]
        print(f"dropping {UNUSED_CLASSIFIER}: unused by OpenELMForCausalLM", file=sys.stderr)
    head, embeddings = weights.get("lm_head.weight"), weights.get("transformer.token_embeddings.weight")
    if tied and head is not None and not (embeddings is not None and _same(head, embeddings)):
        print("dropping lm_head.weight: tie_word_embeddings makes the head the token embeddings", file=sys.stderr)
    if tied:
        weights.pop("lm_head.weight", None)
    return {**config, "share_input_output_layers": tied}, weights


def _flag(config: dict, name: str, default: bool) -> bool:
    value = config.get(name, default)
    if not isinstance(value, bool):
        raise ElmError(f"config.json: {name} must be true or false, got {value!r}"[:300])
    return value


def _same(a: mx.array, b: mx.array) -> bool:
    return a.shape == b.shape and mx.array_equal(a, b).item()


def weight_files(directory: Path) -> List[Path]:
    """The weight files of a Hugging Face layout directory, every shard accounted for and inside it."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = file_in_source(directory, index_name, "shard index")
        if index.is_file():
            shards = _shard_names(index)
            files = [file_in_source(directory, s, f"shard listed in {index_name}:") for s in shards]
            missing = [s for s, f in zip(shards, files) if not f.is_file()]
            if missing:
                raise ElmError(f"missing shard {missing[0]} (listed in {index_name})")
            return files
        file = file_in_source(directory, single, "weights")
        if file.is_file():
            return [file]
    raise ElmError(f"no weights in {directory}: expected model.safetensors or pytorch_model.bin (or their sharded forms)")


def _shard_names(index: Path) -> List[str]:
    """The distinct file names an index's weight_map points to (tensor name -> file name, both strings)."""
    weight_map = read_json_object(index, MAX_INDEX_BYTES, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ElmError(f"shard index {index} needs a non-empty \"weight_map\" object (tensor name -> shard file)")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ElmError(f"shard index {index}: every weight_map entry must map a tensor name to a file name (strings)")
    shards = sorted(set(weight_map.values()))
    if len(shards) > MAX_SHARDS:
        raise ElmError(f"shard index {index} lists {len(shards)} shards; at most {MAX_SHARDS} are accepted")
    return shards


def _read_weight_file(file: Path) -> Dict[str, mx.array]:
    return read_safetensors(file) if file.suffix == ".safetensors" else load_torch_state_dict(file)


def corenet_to_hf_names(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    return {("lm_head.weight" if k == "classifier.weight" else f"transformer.{k}"): v for k, v in weights.items()}


def corenet_model_name(yaml_file: Path) -> str:
    """model.language_modeling.general_gpt.model_name from a CoreNet training YAML."""
    import yaml

    text = read_small_file(yaml_file, MAX_YAML_BYTES, "CoreNet config")
    try:
        text = text.decode("utf-8")
        _check_yaml_size(text)
        config = yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
        reason = str(e).replace("\n", " ")[:200]
        raise ElmError(f"cannot read CoreNet config {yaml_file}: {reason}") from None
    try:
        name = config["model"]["language_modeling"]["general_gpt"]["model_name"]
    except (KeyError, TypeError, IndexError):
        raise ElmError(f"{yaml_file} has no model.language_modeling.general_gpt.model_name") from None
    if not isinstance(name, str) or name not in CORENET_SIZES:  # shown briefly: it may be huge or a list
        shown = repr(name) if isinstance(name, str) and len(name) < 100 else f"a {type(name).__name__}"
        raise ElmError(f"{yaml_file} names model {shown}; supported: {', '.join(CORENET_SIZES)}")
    return name


def _check_yaml_size(text: str) -> None:
    """Refuse YAML whose nodes, aliases expanded, exceed MAX_YAML_NODES, or that nests too deep.

    safe_load shares aliased nodes, so a small file can describe 10^9 of them;
    counting with the event stream bounds that before anything is built.
    """
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    total, open_nodes, anchored = 0, [], {}
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.AliasEvent):
            total += anchored.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor:
                anchored[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append((total, event.anchor))
            total += 1
            if len(open_nodes) > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep")
        elif isinstance(event, yaml.CollectionEndEvent):
            start, anchor = open_nodes.pop()
            if anchor:
                anchored[anchor] = total - start
        if total > MAX_YAML_NODES:
            raise yaml.YAMLError(f"more than {MAX_YAML_NODES:,} nodes with aliases expanded (an alias bomb?)")


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
