"""Training data: JSONL or plain-text files turned into batches of token ids and loss masks.

Accepted lines (one JSON object each):
    {"text": "..."}                                  the whole text is trained on
    {"prompt": "...", "completion": "..."}           with mask_prompt, only the completion
    {"messages": [{"role": ..., "content": ...}]}    rendered with the model's chat template;
                                                     with mask_prompt, only assistant turns
A .txt file is one long document for continued pre-training.

Text documents are packed end to end into windows of exactly max_seq_length
tokens (no padding at all); the other formats keep one example per row and are
batched by length, so padding stays small.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ElmError
from ..tokenizer import Tokenizer

SPLITS = ("train", "valid", "test")


@dataclass
class Example:
    """Token ids and, per token, whether predicting it counts in the loss."""

    tokens: List[int]
    weights: List[int]


@dataclass
class Dataset:
    examples: List[Example]
    packed: bool  # text packed into equal windows, vs one example per row
    truncated: int = 0  # examples cut to max_seq_length


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode_check(text: str) -> None:
    """Refuse strings that are not Unicode text (JSON allows lone surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ElmError(f"the text holds {text[e.start]!r}, a lone surrogate that is not valid Unicode (an escape like \\ud800?)") from None


def _encode(tokenizer: Tokenizer, text: str) -> List[int]:
    """Token ids of `text`, as generation without chat formatting encodes it."""
    _encode_check(text)
    return tokenizer.encode(text)


def _with_eos(tokenizer: Tokenizer, ids: List[int]) -> List[int]:
    eos = min(tokenizer.eos_ids) if tokenizer.eos_ids else None
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def _segments_example(tokenizer: Tokenizer, segments: List[Tuple[str, bool]], add_eos: bool) -> Example:
    """Tokenize the joined text once; weight tokens by the segment they start in.

    Boundaries are found by encoding each prefix and taking the longest run of
    ids it shares with the full encoding, so a token merged across a boundary
    belongs to the earlier segment.
    """
    full_text = "".join(text for text, _ in segments)
    tokens = _encode(tokenizer, full_text)
    if add_eos:
        tokens = _with_eos(tokenizer, tokens)
    weights = [0] * len(tokens)
    start, prefix = 0, ""
    for i, (text, trained) in enumerate(segments):
        prefix += text
        end = len(tokens) if i == len(segments) - 1 else _common_prefix(_encode(tokenizer, prefix), tokens)
        if trained:
            weights[start:end] = [1] * (end - start)
        start = max(start, end)
    return Example(tokens, weights)


def _chat_example(tokenizer: Tokenizer, messages: list, mask_prompt: bool) -> Example:
    """A conversation encoded as inference encodes it (encode_chat: special tokens only from the template, so a
    "</s>" inside a message stays text), each token weighted by the turn it starts in.

    Turn boundaries are the longest run of ids each conversation prefix shares
    with the whole; the template must render conversations turn by turn.
    """
    for m in messages:
        _encode_check(m["content"])
    tokens = tokenizer.encode_chat(messages, add_generation_prompt=False)
    weights = [0] * len(tokens)
    start, done = 0, ""

    def turn(prefix: list, generation_prompt: bool, trained: bool, last: bool = False) -> None:
        nonlocal start, done
        rendered = tokenizer.apply_chat_template(prefix, add_generation_prompt=generation_prompt)
        if not rendered.startswith(done):
            raise ElmError("the chat template does not render conversations turn by turn; train without --mask-prompt")
        done = rendered
        end = len(tokens) if last else _common_prefix(tokenizer.encode_chat(prefix, add_generation_prompt=generation_prompt), tokens)
        if trained:
            weights[start:end] = [1] * (end - start)
        start = max(start, end)

    for i, message in enumerate(messages):
        is_assistant = message["role"] == "assistant"
        if is_assistant and i > 0:  # the assistant tag itself is prompt, not answer
            turn(messages[:i], True, not mask_prompt)
        turn(messages[: i + 1], False, is_assistant or not mask_prompt, last=i == len(messages) - 1)
    return Example(tokens, weights)


def parse_line(tokenizer: Tokenizer, record, mask_prompt: bool) -> Tuple[Example, bool]:
    """One JSONL record to an Example; the flag says whether it is plain text (packable)."""
    if not isinstance(record, dict):
        raise ElmError("expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ElmError("'messages' must be a non-empty list")
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ElmError("each message must be an object with string 'role' and 'content'")
        if mask_prompt and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            raise ElmError("no assistant message to train on (--mask-prompt trains only on assistant turns)")
        return _chat_example(tokenizer, messages, mask_prompt), False
    if "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ElmError("'prompt' and 'completion' must both be strings")
        if not completion:
            raise ElmError("'completion' is empty")
        return _segments_example(tokenizer, [(prompt, not mask_prompt), (completion, True)], add_eos=True), False
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise ElmError("'text' must be a non-empty string")
        tokens = _with_eos(tokenizer, _encode(tokenizer, text))
        return Example(tokens, [1] * len(tokens)), True
    raise ElmError(f"none of the known formats (keys 'text', 'prompt'+'completion' or 'messages'); got keys {sorted(record)}")


def _read_jsonl(file: Path, tokenizer: Tokenizer, mask_prompt: bool) -> Tuple[List[Example], bool]:
    examples, kinds = [], set()
    for number, line in enumerate(read_text(file).split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            example, is_text = parse_line(tokenizer, json.loads(line), mask_prompt)
        except json.JSONDecodeError as e:
            raise ElmError(f"{file}:{number}: {_json_problem(line, e)}") from None
        except RecursionError:
            raise ElmError(f"{file}:{number}: JSON nested too deeply") from None
        except ElmError as e:
            raise ElmError(f"{file}:{number}: {e}") from None
        examples.append(example)
        kinds.add(is_text)
    if not examples:
        raise ElmError(f"{file} is empty")
    return examples, kinds == {True}


def _json_problem(line: str, e: json.JSONDecodeError) -> str:
    """What is wrong with a line's JSON; one that stops mid-value is most likely a truncated file or a wrapped record."""
    if not line[e.pos :].strip() or e.msg.startswith("Unterminated string"):
        return f"not valid JSON: the line ends mid-value ({e.msg}); is the file truncated, or a record split over lines?"
    return f"not valid JSON (column {e.colno}: {e.msg})"


def _text_example(tokenizer: Tokenizer, text: str, source: str) -> Example:
    if not text.strip():
        raise ElmError(f"{source} is empty")
    tokens = _with_eos(tokenizer, _encode(tokenizer, text))
    return Example(tokens, [1] * len(tokens))


def pack(examples: List[Example], length: int) -> List[Example]:
    """Concatenate and cut into windows of length + 1 tokens (inputs and shifted targets overlap by one)."""
    stream = [t for e in examples for t in e.tokens]
    windows = [stream[i : i + length + 1] for i in range(0, len(stream) - length, length)]
    return [Example(w, [1] * len(w)) for w in windows]


def _finish(examples: List[Example], packed: bool, max_seq_length: int, source: str) -> Dataset:
    if packed:
        windows = pack(examples, max_seq_length)
        if not windows:
            total = sum(len(e.tokens) for e in examples)
            raise ElmError(f"{source} has {total} tokens, fewer than one sequence of --max-seq-length {max_seq_length} + 1")
        return Dataset(windows, packed=True)
    truncated = 0
    for e in examples:
        if len(e.tokens) > max_seq_length + 1:
            e.tokens, e.weights = e.tokens[: max_seq_length + 1], e.weights[: max_seq_length + 1]
            truncated += 1
    if truncated:
        print(
            f"warning: {source}: {truncated} of {len(examples)} examples are longer than --max-seq-length and were truncated",
            file=sys.stderr,
        )
    kept = [e for e in examples if sum(e.weights[1:]) > 0]
    if not kept:
        raise ElmError(f"{source}: no example has a token to train on")
    return Dataset(kept, packed=False, truncated=truncated)


def load_datasets(
    data: str, tokenizer: Tokenizer, max_seq_length: int, mask_prompt: bool = False, valid_fraction: float = 0.1
) -> Dict[str, Dataset]:
    """train/valid (and test when present) from a data directory, or from one .txt file split by position.

    A directory holds train.jsonl / valid.jsonl / test.jsonl (or .txt). A
    single .txt file gives its last `valid_fraction` (cut at a line break) as
    validation data.
    """
    path = Path(data).expanduser()
    if not path.exists():
        raise ElmError(f"data path {path} does not exist")
    if path.is_file():
        if path.suffix != ".txt":
            raise ElmError(f"{path}: a data file must be a .txt; JSONL data goes in a directory with train.jsonl and valid.jsonl")
        text = read_text(path)
        cut = holdout_start(text, valid_fraction)
        return {
            "train": _finish([_text_example(tokenizer, text[:cut], f"{path} (train part)")], True, max_seq_length, str(path)),
            "valid": _finish([_text_example(tokenizer, text[cut:], f"{path} (valid part)")], True, max_seq_length, str(path)),
        }
    datasets = {}
    for split in SPLITS:
        jsonl, txt = path / f"{split}.jsonl", path / f"{split}.txt"
        if jsonl.is_file():
            examples, packed = _read_jsonl(jsonl, tokenizer, mask_prompt)
            datasets[split] = _finish(examples, packed, max_seq_length, str(jsonl))
        elif txt.is_file():
            datasets[split] = _finish([_text_example(tokenizer, read_text(txt), str(txt))], True, max_seq_length, str(txt))
        elif split != "test":
            raise ElmError(f"{path} has no {split}.jsonl (or {split}.txt)")
    return datasets


def holdout_start(text: str, fraction: float) -> int:
    """Where the last `fraction` of a text begins, moved back to a line start when there is one."""
    position = int(len(text) * (1 - fraction))
    return text.rfind("\n", 0, position) + 1 or position


def read_text(file: Path) -> str:
    """The file as text; a byte that is not UTF-8 (a file cut mid-character, say) is named by file:line."""
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ElmError(f"{file}:{line}: not UTF-8 text ({e.reason} at byte {column} of the line)") from None


class Batches:
    """Deterministic batches: which rows make micro-batch k depends only on (seed, k).

    This is what lets an interrupted run resume on exactly the batches it would
    have seen. Packed windows are reshuffled every epoch; length-batched
    examples are grouped by length once, and the groups' order is reshuffled.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, pad_multiple: int = 8):
        n = len(dataset.examples)
        if n < batch_size:
            raise ElmError(f"the training set has {n} sequences, fewer than --batch-size {batch_size}")
        self.dataset, self.batch_size, self.seed, self.pad_multiple = dataset, batch_size, seed, pad_multiple
        self.per_epoch = n // batch_size
        order = sorted(range(n), key=lambda i: len(dataset.examples[i].tokens))
        self._groups = [order[i * batch_size : (i + 1) * batch_size] for i in range(self.per_epoch)]

    def rows(self, k: int) -> List[int]:
        epoch, i = divmod(k, self.per_epoch)
        rng = np.random.default_rng([self.seed, epoch])
        if self.dataset.packed:
            return rng.permutation(len(self.dataset.examples))[i * self.batch_size : (i + 1) * self.batch_size].tolist()
        return self._groups[rng.permutation(self.per_epoch)[i]]

    def batch(self, k: int, part: int = 0, parts: int = 1):
        """Micro-batch k, or this process's share of it (its contiguous slice: part of parts)."""
        rows = self.rows(k)
        share = len(rows) // parts
        return collate([self.dataset.examples[r] for r in rows[part * share : (part + 1) * share]], self.pad_multiple)


def eval_batches(dataset: Dataset, batch_size: int, limit: Optional[int] = None, pad_multiple: int = 8):
    """All of a split in length order, or `limit` of its batches spread evenly over it, for loss evaluation.

    Spread, not the first ones: those would be only the shortest examples, or
    only the start of a held-out text. The sample is the same at every step,
    so the validation curve compares like with like.
    """
    order = sorted(range(len(dataset.examples)), key=lambda i: len(dataset.examples[i].tokens))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if limit and limit < len(batches):
        batches = [batches[i * len(batches) // limit] for i in range(limit)]
    for rows in batches:
        yield collate([dataset.examples[r] for r in rows], pad_multiple)


def collate(examples: List[Example], pad_multiple: int = 8):
    """Pad to a common length (rounded up, so few distinct shapes are compiled).

    Returns inputs (B, L), targets (B, L) and per-target weights (B, L), numpy.
    """
    longest = max(len(e.tokens) for e in examples) - 1
    length = -(-longest // pad_multiple) * pad_multiple
    inputs = np.zeros((len(examples), length), np.int32)
    targets = np.zeros((len(examples), length), np.int32)
    weights = np.zeros((len(examples), length), np.float32)
    for row, e in enumerate(examples):
        n = len(e.tokens) - 1
        inputs[row, :n] = e.tokens[:-1]
        targets[row, :n] = e.tokens[1:]
        weights[row, :n] = e.weights[1:]
    return inputs, targets, weights
