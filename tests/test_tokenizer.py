"""Tokenizers, the streaming detokenizer and chat formatting."""

import json

import pytest

from conftest import LLAMA_TOKENIZER, _training_text, need_shared
from elm_mlx.errors import ElmError
from elm_mlx.tokenizer import DEFAULT_CHAT_TEMPLATE, SentencePieceTokenizer, load_tokenizer

MIXED_TEXT = "Héllo wörld, café crème! 日本語のテキスト and 中文 🙂👍🏽 done.\nNew line ß."


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return SentencePieceTokenizer(need_shared(LLAMA_TOKENIZER))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_sp_model):
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(tiny_sp_model)
    return SentencePieceTokenizer(path)


def stream(tokenizer, ids, **kwargs):
    detok = tokenizer.detokenizer(**kwargs)
    pieces = [detok.add(i) for i in ids] + [detok.finalize()]
    return pieces


def test_llama_hello_world(llama):
    assert llama.encode("Hello world") == [1, 15043, 3186]
    assert llama.bos_id == 1 and llama.eos_ids == {2} and llama.vocab_size == 32000


def test_llama_streaming_round_trips_accents_cjk_and_emoji(llama):
    ids = llama.encode(MIXED_TEXT, add_bos=False)
    assert any(llama.sp.is_byte(i) for i in ids)  # the emoji really goes through byte fallback
    pieces = stream(llama, ids)
    assert "".join(pieces) == MIXED_TEXT == llama.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # never a half character mid-stream


def test_llama_streaming_with_bos_and_eos(llama):
    ids = llama.encode("Hi there 🙂") + [2]
    assert "".join(stream(llama, ids)) == "Hi there 🙂" == llama.decode(ids)


def test_generation_keeps_the_word_boundary_space(llama):
    # What a model generates after a prompt continues it: prompt + output == decode(everything).
    prompt = llama.encode("The capital of")
    generated = llama.encode(" France is Paris, café 🙂", add_bos=False)
    text = "".join(stream(llama, generated, trim_leading_space=False))
    assert llama.decode(prompt) + text == llama.decode(prompt + generated)


def test_tiny_trained_tokenizer_round_trips(tiny):
    for text in ["the king speak café", "日本語 🙂 naïve", "x\ny  z"]:
        ids = tiny.encode(text, add_bos=False)
        assert "".join(stream(tiny, ids)) == tiny.decode(ids) == text


def test_special_tokens_in_text_are_parsed_only_when_asked(llama):
    assert llama.encode("a</s>b", add_bos=False)[1] == 2
    assert 2 not in llama.encode("a</s>b", add_bos=False, parse_special=False)
    assert llama.encode("<s>hi").count(1) == 1  # an explicit BOS is not doubled


def test_tokenizer_json_matches_sentencepiece(tmp_path, tiny_sp_model):
    """A tokenizer.json made by transformers' own converter encodes and streams like the .model file."""
    transformers = pytest.importorskip("transformers")
    (tmp_path / "tokenizer.model").write_bytes(tiny_sp_model)
    # legacy: text after a special token starts a new word, as sentencepiece itself encodes it
    converted = transformers.LlamaTokenizer.from_pretrained(str(tmp_path), legacy=True)
    json_dir = tmp_path / "json"
    json_dir.mkdir()
    converted.backend_tokenizer.save(str(json_dir / "tokenizer.json"))
    (json_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))

    from_json = load_tokenizer(json_dir)
    from_model = load_tokenizer(tmp_path)
    assert type(from_json).__name__ == "HFTokenizer"
    for text in ["the king speak café", "日本語 🙂 naïve", "lord</s>lady"]:
        ids = from_model.encode(text)
        assert from_json.encode(text) == ids
        assert "".join(stream(from_json, ids)) == from_json.decode(ids) == from_model.decode(ids)
    assert from_json.eos_ids == {2} and from_json.bos_id == 1


def test_byte_level_tokenizer_json_streams_exactly(tmp_path):
    """GPT-2 style byte-level BPE (as OLMo uses): bytes of split characters must be reassembled."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_text(500), trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))

    loaded = load_tokenizer(tmp_path)
    ids = loaded.encode(MIXED_TEXT)
    assert loaded.add_bos is False and loaded.eos_ids == {0}
    pieces = stream(loaded, ids)
    assert "".join(pieces) == MIXED_TEXT
    assert not any("\ufffd" in p for p in pieces)


def test_default_chat_template_is_zephyr_style(llama):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ]
    text = llama.apply_chat_template(messages)
    assert text == (
        "<|system|>\nBe brief.</s>\n<|user|>\nHi!</s>\n<|assistant|>\nHello.</s>\n<|user|>\nName a colour.</s>\n<|assistant|>\n"
    )
    assert llama.apply_chat_template(messages[:2], add_generation_prompt=False).endswith("Hi!</s>\n")
    ids = llama.encode(text)
    assert ids[0] == 1 and ids.count(2) == 4  # each "</s>" became the eos token


def test_model_directory_can_override_the_chat_template(tmp_path, tiny_sp_model):
    (tmp_path / "tokenizer.model").write_bytes(tiny_sp_model)
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.template_from_model and tokenizer.chat_template != DEFAULT_CHAT_TEMPLATE
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hey"}]) == "[user] hey\n[assistant] "


def test_bad_conversations_are_refused(tiny):
    with pytest.raises(ElmError, match="unknown role 'robot'"):
        tiny.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(ElmError, match="no messages"):
        tiny.apply_chat_template([])


def test_directory_without_tokenizer_says_what_to_do(tmp_path):
    with pytest.raises(ElmError, match="no tokenizer.model or tokenizer.json.*Llama-2"):
        load_tokenizer(tmp_path)


def test_unreadable_tokenizer_is_one_error(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ElmError, match="could not read the tokenizer"):
        load_tokenizer(tmp_path)


def test_ids_beyond_the_tokenizer_vocabulary_stream_as_nothing(tiny):
    ids = tiny.encode("the king", add_bos=False)
    assert "".join(stream(tiny, [ids[0], tiny.vocab_size + 5, *ids[1:]])) == "the king"
