"""Tokenizers, streaming detokenization and chat formatting.

OpenELM uses Meta's Llama-2 SentencePiece model (`tokenizer.model`); converted
repos may carry a Hugging Face `tokenizer.json` instead. Both are wrapped in
one interface. Streaming works on bytes: every token id maps to the exact
bytes it contributes (SentencePiece's '▁' becomes a space, byte-fallback
pieces like <0xE2> become that byte), and an incremental UTF-8 decoder emits
text only once a character is complete, so accents, CJK and emoji never come
out as replacement characters mid-stream.
"""

import codecs
import json
import re
import secrets
from functools import cached_property
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .chat_template import TemplateError, render_template
from .errors import ElmError

# Zephyr-style format of the -Instruct models: a role tag line, the content,
# the eos token; generation is prompted with a final assistant tag.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHAT_ROLES = ("system", "user", "assistant")

# Everything a model directory may carry that describes its tokenizer.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class StreamingDetokenizer:
    """Feed token ids one at a time; get back the text they complete."""

    def __init__(self, token_bytes: Sequence[bytes], trim_leading_space: bool = False):
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._trim = trim_leading_space
        self._started = False

    def add(self, token: int) -> str:
        # Models may pad their vocabulary past the tokenizer's; those ids have no text.
        piece = self._token_bytes[token] if token < len(self._token_bytes) else b""
        if not self._started and piece:
            self._started = True
            if self._trim and piece.startswith(b" "):
                piece = piece[1:]
        return self._utf8.decode(piece)

    def finalize(self) -> str:
        """Flush an incomplete trailing character (as U+FFFD, like a full decode would)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Common interface; subclasses provide plain encoding, decoding and the bytes of each token."""

    bos_id: Optional[int]
    eos_ids: set
    bos_token: str
    eos_token: str
    add_bos: bool
    # Strings in a prompt that stand for a single special token (e.g. "</s>").
    special_tokens: Dict[str, int]
    # True when a full decode drops the space SentencePiece adds before the first word.
    trims_leading_space: bool

    def __init__(self, chat_template: Optional[str] = None):
        # A template shipped with the model marks it as a chat model.
        self.template_from_model = chat_template is not None
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE

    # -- subclass interface ------------------------------------------------
    def _encode_plain(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def _build_token_bytes(self) -> List[bytes]:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    # -- shared behaviour --------------------------------------------------
    @cached_property
    def token_bytes(self) -> List[bytes]:
        return self._build_token_bytes()

    @cached_property
    def _special_pattern(self) -> "re.Pattern":
        """Splits text around special-token strings, longest first, keeping them as parts."""
        return re.compile("(" + "|".join(re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)) + ")")

    def encode(self, text: str, add_bos: Optional[bool] = None, parse_special: bool = True) -> List[int]:
        """Text to ids. With parse_special, strings like "</s>" become their special token.

        Text between special tokens is encoded piece by piece, each piece as
        sentencepiece encodes a whole text (the Llama-2 "legacy" behaviour).
        """
        ids: List[int] = []
        if parse_special and self.special_tokens:
            for part in self._special_pattern.split(text):
                if part in self.special_tokens:
                    ids.append(self.special_tokens[part])
                elif part:
                    ids.extend(self._encode_plain(part))
        else:
            ids = self._encode_plain(text)
        return self._with_bos(ids, add_bos)

    def detokenizer(self, trim_leading_space: Optional[bool] = None) -> StreamingDetokenizer:
        """A streaming detokenizer; by default it trims exactly as decode() does."""
        trim = self.trims_leading_space if trim_leading_space is None else trim_leading_space
        return StreamingDetokenizer(self.token_bytes, trim)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation to prompt text with the model's (or the default Zephyr) template.

        This text is for showing and for offsets; encode it with encode_chat,
        never with encode, which would parse special-token strings in the messages.
        """
        return self._render(_checked_messages(messages), add_generation_prompt)

    def encode_chat(
        self, messages: Sequence[dict], add_generation_prompt: bool = True, add_bos: Optional[bool] = None, start: int = 0
    ) -> List[int]:
        """Ids of a conversation in which special tokens come only from the template.

        Message contents are encoded as ordinary text: "</s>" or "<|user|>" in a
        message becomes text pieces, never a turn boundary. Equal to
        encode(apply_chat_template(...)) when no message contains such a string.
        `start` skips that many characters of the rendered text (the part the
        caller already has as tokens); BOS as in encode().
        """
        segments = _drop_chars(self.chat_segments(messages, add_generation_prompt), start)
        return self._with_bos(self._encode_segments(segments), add_bos)

    def chat_turn_end(self, messages: Sequence[dict]) -> int:
        """Offset in the rendered conversation just past the last eos token the template wrote (-1 if none)."""
        offset, end = 0, -1
        for text, from_template in self.chat_segments(messages, add_generation_prompt=False):
            if from_template and self.eos_token and self.eos_token in text:
                end = offset + text.rindex(self.eos_token) + len(self.eos_token)
            offset += len(text)
        return end

    def chat_segments(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> List[Tuple[str, bool]]:
        """The rendered conversation as (text, from_template) pieces; their texts joined are apply_chat_template's.

        Special-token strings in pieces not from the template are text. The
        template is rendered with a random tag in place of each content; where
        putting the contents back gives exactly the real rendering, the tags
        mark the contents. A template that changes contents (e.g. strips them)
        is rendered again with only the special-token strings in contents
        replaced by tags; that must also put back to the real rendering, or
        the conversation is refused.
        """
        messages = _checked_messages(messages)
        text = self._render(messages, add_generation_prompt)
        contents = [m["content"] for m in messages]
        tags = _Tags(contents)
        skeleton = self._render([{**m, "content": tags.tag(i)} for i, m in enumerate(messages)], add_generation_prompt)
        segments = tags.fill(skeleton, contents)
        if segments is not None and _joined(segments) == text:
            return segments
        found: List[str] = []
        defused = [{**m, "content": tags.replace(self._control_pattern, m["content"], found)} for m in messages]
        segments = tags.fill(self._render(defused, add_generation_prompt), found)
        if segments is None or _joined(segments) != text:
            raise ElmError(
                "the chat template changes special-token text inside messages (e.g. upper-cases it), so the "
                "messages cannot be kept apart from the template's own tokens; remove such text from the messages"
            )
        return segments

    # -- chat helpers --------------------------------------------------------
    @cached_property
    def _control_pattern(self) -> Optional["re.Pattern"]:
        """Strings that encode() or _encode_plain() would turn into a token that is not text.

        One capturing group, so that split() keeps the matches as parts.
        """
        strings = set(self.special_tokens) | set(self._plain_added_tokens)
        if not strings:
            return None
        return re.compile("(" + "|".join(re.escape(t) for t in sorted(strings, key=len, reverse=True)) + ")")

    @property
    def _plain_added_tokens(self) -> Dict[str, int]:
        """Added tokens that _encode_plain itself matches in text (HF's non-special added tokens)."""
        return {}

    def _encode_text(self, text: str) -> List[int]:
        """Text as text: no string becomes an added or special token."""
        return self._encode_plain(text)

    def _render(self, messages: List[dict], add_generation_prompt: bool) -> str:
        try:
            return render_template(
                self.chat_template,
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as e:
            raise ElmError(f"chat template failed: {e}") from None

    def _encode_segments(self, segments: List[Tuple[str, bool]]) -> List[int]:
        """Special tokens only from template text; the text between them encoded as one string, as encode() does."""
        ids: List[int] = []
        run: List[Tuple[str, bool]] = []
        for text, from_template in segments:
            if not (from_template and self.special_tokens):
                run.append((text, from_template))
                continue
            for part in self._special_pattern.split(text):
                if part in self.special_tokens:
                    ids.extend(self._encode_run(run))
                    ids.append(self.special_tokens[part])
                    run = []
                elif part:
                    run.append((part, True))
        return ids + self._encode_run(run)

    def _encode_run(self, run: List[Tuple[str, bool]]) -> List[int]:
        """One stretch between special tokens. Added-token strings from messages are cut out and encoded as text."""
        plain = self._plain_added_tokens
        ids: List[int] = []
        pending = ""
        for text, from_template in run:
            if from_template or not plain:
                pending += text
                continue
            for part in self._control_pattern.split(text) if self._control_pattern else [text]:
                if part in plain:
                    ids.extend(self._encode_plain(pending) if pending else [])
                    ids.extend(self._encode_text(part))
                    pending = ""
                else:
                    pending += part
        return ids + (self._encode_plain(pending) if pending else [])

    def _with_bos(self, ids: List[int], add_bos: Optional[bool]) -> List[int]:
        add_bos = self.add_bos if add_bos is None else add_bos
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids


def _checked_messages(messages: Sequence[dict]) -> List[dict]:
    """Validated copies holding only role and content: nothing else a caller sent reaches the template."""
    if not messages:
        raise ElmError("the conversation has no messages")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ElmError(f"message {i} must be an object with a string 'content'")
        if message.get("role") not in CHAT_ROLES:
            raise ElmError(f"message {i} has unknown role {message.get('role')!r}; expected one of {', '.join(CHAT_ROLES)}")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


class _Tags:
    """Unique stand-ins for strings while a template renders: private-use characters around a random number.

    Nothing a case change, strip or trim does alters them, and a message
    cannot contain one by accident or design (the number is new each time and
    checked against the messages).
    """

    def __init__(self, texts: Sequence[str]):
        while True:
            self.prefix = f"\U000f0000{secrets.randbits(64)}:"
            if not any(self.prefix in t for t in texts):
                break
        self.pattern = re.compile(re.escape(self.prefix) + "([0-9]+)\U000f0001")

    def tag(self, index: int) -> str:
        return f"{self.prefix}{index}\U000f0001"

    def replace(self, pattern: Optional["re.Pattern"], text: str, found: List[str]) -> str:
        """`text` with each match of `pattern` replaced by a tag; the matches are appended to `found`."""

        def stand_in(match):
            found.append(match.group(0))
            return self.tag(len(found) - 1)

        return pattern.sub(stand_in, text) if pattern else text

    def fill(self, rendered: str, values: Sequence[str]) -> Optional[List[Tuple[str, bool]]]:
        """(text, from_template) pieces with each tag put back as values[i]; None if a tag came out altered."""
        parts = self.pattern.split(rendered)
        segments = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                if self.prefix in part:  # a tag the template cut or changed
                    return None
                if part:
                    segments.append((part, True))
            elif int(part) < len(values):
                segments.append((values[int(part)], False))
            else:
                return None
        return segments


def _joined(segments: List[Tuple[str, bool]]) -> str:
    return "".join(text for text, _ in segments)


def _drop_chars(segments: List[Tuple[str, bool]], count: int) -> List[Tuple[str, bool]]:
    """The segments without their first `count` characters."""
    out = []
    for text, from_template in segments:
        if count >= len(text):
            count -= len(text)
            continue
        out.append((text[count:], from_template))
        count = 0
    return out


def _metaspace_bytes(piece: str) -> bytes:
    """Bytes of a SentencePiece-style piece: '▁' is a space, '<0xNN>' is one raw byte."""
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model_file: Path, chat_template: Optional[str] = None):
        import sentencepiece

        super().__init__(chat_template)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_ids = {self.sp.eos_id()} if self.sp.eos_id() >= 0 else set()
        self.bos_token = self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else ""
        self.eos_token = self.sp.id_to_piece(self.sp.eos_id()) if self.eos_ids else ""
        self.add_bos = True  # OpenELM was trained with BOS at the start of every sequence.
        self.special_tokens = {t: self.sp.piece_to_id(t) for t in (self.bos_token, self.eos_token) if t}
        self.trims_leading_space = True

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _encode_plain(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def _build_token_bytes(self) -> List[bytes]:
        table = []
        for i in range(self.sp.get_piece_size()):
            if self.sp.is_control(i):
                table.append(b"")
            elif self.sp.is_unknown(i):
                table.append(" \u2047 ".encode())  # what sp.decode prints for <unk>
            else:
                table.append(_metaspace_bytes(self.sp.id_to_piece(i)))
        return table


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (via the `tokenizers` library)."""

    def __init__(self, tokenizer_file: Path, tokenizer_config: dict, chat_template: Optional[str] = None):
        from tokenizers import Tokenizer as RustTokenizer

        super().__init__(chat_template)
        self.tok = RustTokenizer.from_file(str(tokenizer_file))
        self.tok.encode_special_tokens = True  # specials in text are split out by encode() itself
        spec = json.loads(self.tok.to_str())
        self._decoder_kinds = _component_types(spec.get("decoder"))
        added = spec.get("added_tokens", [])
        self.special_tokens = {t["content"]: t["id"] for t in added if t.get("special")}
        self._non_special_added = {t["content"]: t["id"] for t in added if not t.get("special")}
        self._spec = spec

        self.bos_token = _token_text(tokenizer_config.get("bos_token")) or ""
        self.eos_token = _token_text(tokenizer_config.get("eos_token")) or ""
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_ids = {eos_id} if eos_id is not None else set()
        if "add_bos_token" in tokenizer_config:
            self.add_bos = bool(tokenizer_config["add_bos_token"])
        else:  # does the tokenizer's own post-processor prepend BOS?
            probe = self.tok.encode("a", add_special_tokens=True).ids
            self.add_bos = bool(probe) and probe[0] == self.bos_id
        self.trims_leading_space = "Strip" in self._decoder_kinds or "Metaspace" in self._decoder_kinds

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def _encode_plain(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    @property
    def _plain_added_tokens(self) -> Dict[str, int]:
        return self._non_special_added

    @cached_property
    def _text_tok(self):
        """The same tokenizer without its added vocabulary: every string is encoded by the model itself."""
        from tokenizers import Tokenizer as RustTokenizer

        return RustTokenizer.from_str(json.dumps({**self._spec, "added_tokens": [], "post_processor": None}))

    def _encode_text(self, text: str) -> List[int]:
        return self._text_tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def _build_token_bytes(self) -> List[bytes]:
        special_ids = set(self.special_tokens.values())
        if "ByteLevel" in self._decoder_kinds:
            byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
            to_bytes = lambda piece: bytes(byte_of[ch] for ch in piece if ch in byte_of)  # noqa: E731
        elif self._decoder_kinds & {"ByteFallback", "Metaspace", "Replace"}:
            to_bytes = _metaspace_bytes
        else:  # e.g. WordPiece: no byte-exact form, so use each token's own decode.
            to_bytes = lambda piece: self.tok.decode([self.tok.token_to_id(piece)]).encode()  # noqa: E731
        table = []
        for i in range(self.vocab_size):
            piece = self.tok.id_to_token(i)
            table.append(b"" if piece is None or i in special_ids else to_bytes(piece))
        return table


def _component_types(spec) -> set:
    """All 'type' names in a tokenizer.json component (decoders nest in Sequence)."""
    if not isinstance(spec, dict):
        return set()
    kinds = {spec.get("type")}
    for child in spec.get("decoders", []) or []:
        kinds |= _component_types(child)
    return kinds


def _token_text(value) -> Optional[str]:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template_from(model_dir: Path, tokenizer_config: dict) -> Optional[str]:
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: use the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_tokenizer(model_dir: Path) -> Tokenizer:
    """The tokenizer of a model directory: tokenizer.json if present, else tokenizer.model."""
    model_dir = Path(model_dir)
    config_file = model_dir / "tokenizer_config.json"
    try:
        tokenizer_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    except json.JSONDecodeError as e:
        raise ElmError(f"{config_file} is not valid JSON ({e})") from None
    template = _chat_template_from(model_dir, tokenizer_config)
    try:
        if (model_dir / "tokenizer.json").is_file():
            return HFTokenizer(model_dir / "tokenizer.json", tokenizer_config, template)
        if (model_dir / "tokenizer.model").is_file():
            return SentencePieceTokenizer(model_dir / "tokenizer.model", template)
    except Exception as e:  # sentencepiece and tokenizers raise bare Exceptions on bad files
        raise ElmError(f"could not read the tokenizer in {model_dir}: {e}") from None
    raise ElmError(
        f"{model_dir} has no tokenizer.model or tokenizer.json; OpenELM uses the Llama-2 tokenizer, "
        "copy its tokenizer.model into that directory (see README: 'The tokenizer')"
    )
