"""load_tokenizer on the real SmolLM tokenizer.json: exact round trips, special ids, bad files."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from smollm import SmolTokenizer, TokenizerError, load_tokenizer

HH_TRANSCRIPT = (
    "\n\nHuman: What's a good recipe for crêpes? I've got 2 eggs 🥚🥚 and\nsome flour."
    "\n\nAssistant: Mix 250 g flour, 2 eggs and 500 ml milk.\n  Rest it 30 min, then fry thin layers!"
    "\n\nHuman: Merci beaucoup 🙏 — and in 日本語?"
    "\n\nAssistant: クレープ (kurēpu). Enjoy 😋\t👍"
)
CHATML_TRANSCRIPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nHi 👋! Can you write ∑ᵢ xᵢ² in LaTeX?\n\nThanks.<|im_end|>\n"
    "<|im_start|>assistant\nSure: `\\sum_i x_i^2` ✅\n    (indented line)<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok(tokenizer_json) -> SmolTokenizer:
    return load_tokenizer(tokenizer_json)


@pytest.mark.parametrize("text", [HH_TRANSCRIPT, CHATML_TRANSCRIPT, "", " ", "\n\n\n", "a  b   c\r\nd"],
                         ids=["hh", "chatml", "empty", "space", "newlines", "whitespace"])
def test_encode_decode_round_trip_is_exact(tok, text):
    ids = tok.encode_ids(text)
    # `tokenizers` drops special tokens on decode unless told not to; ChatML needs them kept.
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_chatml_markers_are_single_special_tokens(tok):
    assert tok.encode_ids("<|im_start|>") == [1]
    assert tok.encode_ids("<|im_end|>") == [2]
    ids = tok.encode_ids(CHATML_TRANSCRIPT)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 3
    assert tok.encode_ids("<|endoftext|>") == [0]


def test_encode_adds_no_special_tokens(tok):
    assert tok.encode_ids("Hello") == tok.encode("Hello").ids  # no BOS is prepended
    assert 0 not in tok.encode_ids("Hello world")


def test_vocab_and_default_special_ids(tok):
    assert tok.vocab_size == 49152
    assert tok.eos_token_id == 0 and tok.bos_token_id == 0
    assert tok.pad_token_id == 0  # no pad token: padding reuses EOS
    assert tok.token_to_id("<|endoftext|>") == 0  # the wrapper passes through to `tokenizers`


def _checkpoint_dir(tmp_path, tokenizer_json, config):
    directory = tmp_path / "tok"
    directory.mkdir()
    shutil.copyfile(tokenizer_json, directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("eos", ["<|im_end|>", {"content": "<|im_end|>", "special": True, "lstrip": False}],
                         ids=["string", "object"])
def test_tokenizer_config_sets_eos_and_pad(tmp_path, tokenizer_json, eos):
    directory = _checkpoint_dir(tmp_path, tokenizer_json, {"eos_token": eos, "bos_token": "<|im_start|>"})
    for path in (directory, directory / "tokenizer.json"):  # a directory or the file itself
        tok = load_tokenizer(path)
        assert tok.eos_token_id == 2 and tok.pad_token_id == 2 and tok.bos_token_id == 1


def test_tokenizer_config_pad_token_is_used(tmp_path, tokenizer_json):
    directory = _checkpoint_dir(tmp_path, tokenizer_json, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    tok = load_tokenizer(directory)
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 0)


def test_save_writes_files_that_load_back(tmp_path, tokenizer_json):
    directory = _checkpoint_dir(tmp_path, tokenizer_json, {"eos_token": "<|im_end|>"})
    tok = load_tokenizer(directory)
    tok.save(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tokenizer_json.read_bytes()
    back = load_tokenizer(tmp_path / "out")
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (0, 2, 2)
    assert back.encode_ids(CHATML_TRANSCRIPT) == tok.encode_ids(CHATML_TRANSCRIPT)


def test_save_into_its_own_directory(tmp_path, tokenizer_json):
    directory = _checkpoint_dir(tmp_path, tokenizer_json, {"eos_token": "<|im_end|>"})
    load_tokenizer(directory).save(directory)  # re-saving a checkpoint in place
    assert (directory / "tokenizer.json").read_bytes() == tokenizer_json.read_bytes()
    assert load_tokenizer(directory).eos_token_id == 2
    assert sorted(p.name for p in directory.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(TokenizerError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="no tokenizer.json there"):
        load_tokenizer(tmp_path)  # a directory without one


def test_invalid_tokenizer_json_names_the_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')
    with pytest.raises(TokenizerError, match=r"tokenizer\.json.*not a valid tokenizer"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"version": "1.0", "model": {"type": "NoSuchModel"}}))
    with pytest.raises(TokenizerError, match=re.escape(str(bad))):
        load_tokenizer(tmp_path)


def test_invalid_tokenizer_config_names_the_file(tmp_path, tokenizer_json):
    directory = _checkpoint_dir(tmp_path, tokenizer_json, {})
    (directory / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(directory)


def test_special_token_not_in_vocab_names_the_file_and_token(tmp_path, tokenizer_json):
    directory = _checkpoint_dir(tmp_path, tokenizer_json, {"eos_token": "</s>"})
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json.*'</s>'.*not in the tokenizer's vocabulary"):
        load_tokenizer(directory)


SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's chat template, as its GGUF and tokenizer_config.json carry it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chat_template_renders_chatml_and_survives_save(tmp_path, tokenizer_json):
    directory = _checkpoint_dir(tmp_path, tokenizer_json, {"eos_token": "<|im_end|>", "chat_template": SMOLLM2_TEMPLATE})
    tok = load_tokenizer(directory)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Capital of France?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
                    "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.stop_token_ids == [2, 0]  # <|im_end|> ends an Instruct turn, <|endoftext|> a base model's text
    tok.save(tmp_path / "out")
    back = load_tokenizer(tmp_path / "out")
    assert back.chat_template == SMOLLM2_TEMPLATE
    assert back.apply_chat_template(messages) == tok.apply_chat_template(messages)

    transformers = pytest.importorskip("transformers", reason="transformers is the rendering oracle")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    for add in (False, True):
        assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add) == \
            tok.apply_chat_template(messages, add_generation_prompt=add)


def test_no_chat_template_is_a_clear_error(tmp_path, tokenizer_json):
    tok = load_tokenizer(tokenizer_json)
    assert tok.chat_template is None and tok.stop_token_ids == [0]
    with pytest.raises(TokenizerError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_named_chat_templates_are_refused_naming_the_file(tmp_path, tokenizer_json):
    directory = _checkpoint_dir(tmp_path, tokenizer_json, {"chat_template": [{"name": "default", "template": "x"}]})
    with pytest.raises(TokenizerError, match="tokenizer_config.json: chat_template must be one Jinja string"):
        load_tokenizer(directory)
