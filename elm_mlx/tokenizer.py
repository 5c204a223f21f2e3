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
from functools import cached_property
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
        add_bos = self.add_bos if add_bos is None else add_bos
        ids: List[int] = []
        if parse_special and self.special_tokens:
            for part in self._special_pattern.split(text):
                if part in self.special_tokens:
                    ids.append(self.special_tokens[part])
                elif part:
                    ids.extend(self._encode_plain(part))
        else:
            ids = self._encode_plain(text)
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def detokenizer(self, trim_leading_space: Optional[bool] = None) -> StreamingDetokenizer:
        """A streaming detokenizer; by default it trims exactly as decode() does."""
        trim = self.trims_leading_space if trim_leading_space is None else trim_leading_space
        return StreamingDetokenizer(self.token_bytes, trim)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Render a conversation to prompt text with the model's (or the default Zephyr) template."""
        if not messages:
            raise ElmError("the conversation has no messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise ElmError(f"message {i} must be an object with a string 'content'")
            if message.get("role") not in CHAT_ROLES:
                raise ElmError(f"message {i} has unknown role {message.get('role')!r}; expected one of {', '.join(CHAT_ROLES)}")
        try:
            return _compile_template(self.chat_template).render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as e:
            raise ElmError(f"chat template failed: {e}") from None


def _raise_exception(message: str):
    raise TemplateError(message)


def _compile_template(source: str):
    # Templates come from model directories: render them in jinja2's sandbox.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


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
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        self.special_tokens = added

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
