"""Paths as hostile input to the converter (issue 12, class 3 "Paths", "--force" and the CoreNet YAML bound).

Every hostile input is made here: shard indexes pointing out of the source,
symlinks to a secret outside it, files that are no tokenizer, YAML bombs and
--force aimed at directories that are no earlier output of ours. Each runs the
CLI in a child under a memory cap and must end in one `error:` line, exit 1,
nothing written and every file in the test's tree (the victims) unchanged.
"""

import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from conftest import random_weights, tiny_config
from convert.pipeline import convert_checkpoint
from elm_mlx.errors import ElmError
from elm_mlx.files import atomic_directory
from hostile import run_limited

SECRET = "SECRET-CONTENT-THAT-MUST-NOT-LEAK"


def tree(root: Path) -> dict:
    """Every path under root -> its bytes (files) or link target (symlinks); folders as None."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                state[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                state[rel] = path.read_bytes()
            else:
                state[rel] = None
    return state


def convert_cli(*args, cwd=None, env=None):
    return run_limited([sys.executable, "-m", "convert", *map(str, args)], timeout=120, cwd=cwd, env={"HF_HUB_OFFLINE": "1", **(env or {})})


def assert_refused(outcome, fragment: str, root: Path, before: dict):
    line = outcome.one_line_error()
    assert outcome.returncode == 1, outcome.stderr
    assert line.startswith("error: ") and fragment in line, line
    assert SECRET not in outcome.stderr + outcome.stdout
    assert tree(root) == before  # nothing written, nothing changed, no partial directory left behind


@pytest.fixture()
def world(tmp_path, tiny_sp_model):
    """A valid HF-layout source with a tokenizer, and a secret file (and a loadable shard) outside it."""
    src = tmp_path / "src"
    src.mkdir()
    config = tiny_config()
    (src / "config.json").write_text(json.dumps(config))
    weights = random_weights(config)
    mx.save_safetensors(str(src / "model.safetensors"), weights)
    (src / "tokenizer.model").write_bytes(tiny_sp_model)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text(json.dumps({"model": {"note": SECRET}, "secret": SECRET}))
    mx.save_safetensors(str(outside / "model-00001-of-00001.safetensors"), weights)
    return tmp_path, src, outside


def make_index(src: Path, name: str, content) -> None:
    (src / "model.safetensors").unlink()
    (src / name).write_text(content if isinstance(content, str) else json.dumps(content))


# ---- item 2: shard indexes ------------------------------------------------------------------------------------------


def _index_cases(outside: Path) -> dict:
    shard = "model-00001-of-00001.safetensors"
    return {
        "dotdot": ("model.safetensors.index.json", {"weight_map": {"a": f"../outside/{shard}"}}, "not a plain file name"),
        "absolute": ("model.safetensors.index.json", {"weight_map": {"a": str(outside / shard)}}, "not a plain file name"),
        "bin dotdot": ("pytorch_model.bin.index.json", {"weight_map": {"a": "../outside/x.bin"}}, "not a plain file name"),
        "weight_map list": ("model.safetensors.index.json", {"weight_map": [shard]}, "weight_map"),
        "weight_map empty": ("model.safetensors.index.json", {"weight_map": {}}, "weight_map"),
        "value not a string": ("model.safetensors.index.json", {"weight_map": {"a": 5}}, "strings"),
        "not an object": ("model.safetensors.index.json", [1, 2], "must hold a JSON object"),
        "not json": ("model.safetensors.index.json", "{weight_map", "not valid JSON"),
        "deeply nested": ("model.safetensors.index.json", "[" * 200_000, "not valid JSON"),
        "invalid utf-8": ("model.safetensors.index.json", None, "not valid JSON"),
    }


@pytest.mark.parametrize(
    "case",
    ["dotdot", "absolute", "bin dotdot", "weight_map list", "weight_map empty", "value not a string", "not an object", "not json", "deeply nested", "invalid utf-8"],
)
def test_shard_index_is_confined_and_validated(world, case):
    root, src, outside = world
    name, content, fragment = _index_cases(outside)[case]
    make_index(src, name, content if content is not None else "")
    if content is None:
        (src / name).write_bytes(b'{"weight_map": {"a": "\xff\xfe"}}')
    before = tree(root)
    assert_refused(convert_cli("--hf-path", src, "--mlx-path", root / "out"), fragment, root, before)


def test_shard_symlink_resolving_outside_is_refused(world):
    root, src, outside = world
    make_index(src, "model.safetensors.index.json", {"weight_map": {"a": "model-00001-of-00001.safetensors"}})
    (src / "model-00001-of-00001.safetensors").symlink_to(outside / "model-00001-of-00001.safetensors")
    before = tree(root)
    assert_refused(convert_cli("--hf-path", src, "--mlx-path", root / "out"), "outside", root, before)


def test_huge_shard_index_is_refused_unread(world):
    root, src, _ = world
    make_index(src, "model.safetensors.index.json", "")
    with open(src / "model.safetensors.index.json", "wb") as f:
        f.truncate(65 << 20)  # sparse: costs no disk
    before = tree(root)
    assert_refused(convert_cli("--hf-path", src, "--mlx-path", root / "out"), "larger than 64 MiB", root, before)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_source_files_linking_outside_are_refused(world, name):
    root, src, outside = world
    target = outside / ("model-00001-of-00001.safetensors" if name == "model.safetensors" else "secret.json")
    (src / name).unlink()
    (src / name).symlink_to(target)
    before = tree(root)
    assert_refused(convert_cli("--hf-path", src, "--mlx-path", root / "out"), "outside", root, before)


# ---- item 3: files copied into the output ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "chat_template.jinja"])
def test_tokenizer_files_linking_outside_the_source_are_not_copied(world, name):
    root, src, outside = world
    (src / name).symlink_to(outside / "secret.json")
    before = tree(root)
    assert_refused(convert_cli("--hf-path", src, "--mlx-path", root / "out"), "outside", root, before)


def test_tokenizer_directory_option_with_a_link_outside_is_refused(world, tiny_sp_model):
    root, src, outside = world
    tok = root / "tok"
    tok.mkdir()
    (tok / "tokenizer.model").write_bytes(tiny_sp_model)
    (tok / "tokenizer_config.json").symlink_to(outside / "secret.json")
    before = tree(root)
    assert_refused(convert_cli("--hf-path", src, "--mlx-path", root / "out", "--tokenizer", tok), "outside", root, before)


def test_hugging_face_cache_snapshot_links_into_its_blobs_still_convert(world):
    """The Hub cache stores files in <repo>/blobs and links them from snapshots/<rev>/: that is inside the source."""
    root, src, _ = world
    repo = root / "models--apple--OpenELM-tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for i, file in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(file.read_bytes())
        (snap / file.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    convert_checkpoint(str(snap), root / "out", dtype="float32", progress=False)
    assert (root / "out" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert not (root / "out" / "tokenizer.model").is_symlink()


# ---- item 4: --tokenizer is checked by content ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["etc passwd", "random bytes", "json without model", "empty"])
def test_tokenizer_option_that_is_no_tokenizer_is_refused(world, kind):
    root, src, _ = world
    (src / "tokenizer.model").unlink()
    bogus = root / "bogus.model"
    if kind == "etc passwd":
        bogus = Path("/etc/passwd")
    elif kind == "random bytes":
        bogus.write_bytes(os.urandom(4096))
    elif kind == "json without model":
        bogus = root / "tokenizer.json"
        bogus.write_text(json.dumps({"version": "1.0", "added_tokens": []}))
    else:
        bogus.write_bytes(b"")
    before = tree(root)
    outcome = convert_cli("--hf-path", src, "--mlx-path", root / "out", "--tokenizer", bogus)
    assert_refused(outcome, "not a SentencePiece model nor a tokenizer.json", root, before)


def test_source_tokenizer_model_that_is_no_sentencepiece_is_refused(world):
    root, src, _ = world
    (src / "tokenizer.model").write_text("root:x:0:0:root:/root:/bin/bash\n")
    before = tree(root)
    assert_refused(convert_cli("--hf-path", src, "--mlx-path", root / "out"), "is not a SentencePiece model", root, before)


# ---- item 5: CoreNet YAML -------------------------------------------------------------------------------------------


def billion_laughs() -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    lines.append("model: {language_modeling: {general_gpt: {model_name: *a9}}}")
    return "\n".join(lines) + "\n"


YAML_CASES = {
    "billion laughs": (billion_laughs(), "alias bomb"),
    "over 1 MiB": ("# " + "x" * (1 << 20) + "\n", "larger than 1 MiB"),
    "deep nesting": ("[" * 500 + "]" * 500, "nested more than"),
    "big value as the name": ('big: &b [' + ",".join(["1"] * 1000) + ']\nmodel: {language_modeling: {general_gpt: {model_name: *b}}}\n', "names model a list"),
    "not utf-8": (None, "cannot read CoreNet config"),
    "not a mapping": ("- 1\n- 2\n", "has no model.language_modeling"),
    "python tag": ("model: !!python/object/apply:os.system ['echo hi']\n", "cannot read CoreNet config"),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_corenet_yaml_is_bounded(world, case):
    root, _, _ = world
    text, fragment = YAML_CASES[case]
    yaml_file = root / "train.yaml"
    if text is None:
        yaml_file.write_bytes(b"model: \xff\xfe\n")
    else:
        yaml_file.write_text(text)
    (root / "ckpt.pt").write_bytes(b"not read: the YAML is refused first")
    before = tree(root)
    outcome = run_limited(
        [sys.executable, "-m", "convert", "--corenet-path", str(root / "ckpt.pt"), "--corenet-config", str(yaml_file), "--mlx-path", str(root / "out")],
        memory_bytes=1500 << 20,
        timeout=60,
    )
    assert_refused(outcome, fragment, root, before)


# ---- item 6: --force --------------------------------------------------------------------------------------------------


@pytest.fixture()
def earlier_output(world):
    root, src, _ = world
    out = root / "earlier"
    convert_checkpoint(str(src), out, dtype="float32", progress=False)
    return out


def test_force_replaces_an_earlier_output_atomically(world, earlier_output):
    root, src, _ = world
    (earlier_output / "README.md").write_text("old card")
    outcome = convert_cli("--hf-path", src, "--mlx-path", earlier_output, "--force", "--dtype", "float16")
    assert outcome.returncode == 0, outcome.stderr
    assert "old card" not in (earlier_output / "README.md").read_text()
    assert sorted(p.name for p in root.iterdir()) == ["earlier", "outside", "src"]  # no temporary sibling left


def _victim_non_model(root, src, earlier):
    victim = root / "photos"
    victim.mkdir()
    (victim / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    return victim, None, "not an elm-mlx output file"


def _victim_output_with_extra(root, src, earlier):
    (earlier / "notes.txt").write_text("mine")
    return earlier, None, "'notes.txt'"


def _victim_output_with_folder(root, src, earlier):
    (earlier / "logs").mkdir()
    return earlier, None, "'logs'"


def _victim_source(root, src, earlier):
    return src, None, "the source"


def _victim_parent_of_source(root, src, earlier):
    return root, None, "the source"


def _victim_cwd(root, src, earlier):
    return Path("."), earlier, "current directory"


def _victim_cwd_parent(root, src, earlier):
    return Path(".."), earlier / "sub", "current directory"


def _victim_symlink(root, src, earlier):
    link = root / "link"
    link.symlink_to(earlier)
    return link, None, "symbolic link"


def _victim_file(root, src, earlier):
    (root / "file.txt").write_text("a file")
    return root / "file.txt", None, "not a directory"


def _victim_only_weights(root, src, earlier):
    victim = root / "w"
    victim.mkdir()
    (victim / "README.md").write_text("someone's notes")
    return victim, None, "holds none of config.json"


VICTIMS = {
    "non-model dir": _victim_non_model,
    "output plus a foreign file": _victim_output_with_extra,
    "output plus a folder": _victim_output_with_folder,
    "the source": _victim_source,
    "a parent of the source": _victim_parent_of_source,
    "the cwd (.)": _victim_cwd,
    "a parent of the cwd": _victim_cwd_parent,
    "a symlink to an output": _victim_symlink,
    "a file": _victim_file,
    "no marker file": _victim_only_weights,
}


@pytest.mark.parametrize("case", list(VICTIMS))
def test_force_never_replaces_what_is_no_earlier_output(world, earlier_output, case):
    root, src, _ = world
    target, cwd, fragment = VICTIMS[case](root, src, earlier_output)
    if cwd is not None:
        cwd.mkdir(exist_ok=True)
    before = tree(root)
    outcome = convert_cli("--hf-path", src.resolve(), "--mlx-path", target, "--force", cwd=cwd)
    assert_refused(outcome, fragment, root, before)


def test_force_never_replaces_home_or_root(world, earlier_output):
    root, src, _ = world
    before = tree(root)
    home = convert_cli("--hf-path", src, "--mlx-path", earlier_output, "--force", env={"HOME": str(earlier_output)})
    assert_refused(home, "home directory", root, before)
    slash = convert_cli("--hf-path", src, "--mlx-path", "/", "--force")
    assert_refused(slash, "--force will not replace /", root, before)


def test_a_failed_conversion_leaves_the_earlier_output_intact(world, earlier_output):
    root, src, _ = world
    (src / "model.safetensors").write_bytes(b"truncated")
    before = tree(root)
    assert_refused(convert_cli("--hf-path", src, "--mlx-path", earlier_output, "--force"), "cannot read model.safetensors", root, before)


def test_swap_failure_restores_the_old_directory(tmp_path, monkeypatch, earlier_output):
    before = tree(earlier_output)
    real_replace = os.replace
    calls = []

    def failing_replace(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # old already set aside, new about to be renamed in
            raise OSError(28, "No space left on device")
        return real_replace(a, b)

    with pytest.raises(ElmError, match="No space left on device"):
        with atomic_directory(earlier_output, force=True) as staging:
            (staging / "config.json").write_text("{}")
            monkeypatch.setattr(os, "replace", failing_replace)
    monkeypatch.undo()
    assert tree(earlier_output) == before
    assert not [p.name for p in earlier_output.parent.iterdir() if p.name.startswith(".")]  # no staging, no holder


def test_error_inside_the_block_leaves_old_output_and_no_staging(earlier_output):
    before = tree(earlier_output.parent)
    with pytest.raises(RuntimeError):
        with atomic_directory(earlier_output, force=True) as staging:
            (staging / "config.json").write_text("{}")
            raise RuntimeError("stop")
    assert tree(earlier_output.parent) == before
