"""Hugging Face chat templates (Jinja, from tokenizer_config.json, chat_template.jinja or a processor's
chat_template.json): a loaded LLaVA's prompt equals transformers' apply_chat_template + processor output token for
token (LLaVA-1.5's template on a Llama tokenizer, ChatML on a Qwen2 one), and `model.chat` answers as
transformers' greedy generate does."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from test_llava import VARIANTS, text_config
from test_lm import randomize
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

import vlfm
from vlfm.data.chat import encode_with_chat_template, render_chat_template
from vlfm.data.tokenizer import Tokenizer
from vlfm.io import UsageError

TEXTS = ["what colour is the circle?", "the circle is red.", "describe the image.", "a blue square and a red star",
         "how many objects are there?", "You are a helpful assistant.", "USER: ASSISTANT: system user"] * 5  # fmt: skip

# llava-hf's LLaVA-1.5 template (content parts: images first, then text) and Qwen2's ChatML one (text content)
LLAVA_15 = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
            "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
            "{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
            "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
            "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
            "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")  # fmt: skip
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")  # fmt: skip
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")  # fmt: skip


def llama_tokenizer():
    """A Llama-style BPE (SentencePiece spaces, `<s>` first) trained on TEXTS, `<image>` a special token."""
    backend = HFTokenizer(models.BPE(unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    backend.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.add_special_tokens(["<image>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    return backend, dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")


def qwen2_tokenizer():
    """A Qwen2-style byte-level BPE (no bos) with ChatML's markers and `<image>` as special tokens."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=330, special_tokens=["<|endoftext|>"], show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    backend.add_special_tokens(["<|im_start|>", "<|im_end|>", "<image>"])
    return backend, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build(directory, kind):
    """A tiny LLaVA (CLIP vision, `kind` LM) saved by transformers with its processor; its tokenizer and processor."""
    backend, special = llama_tokenizer() if kind == "llama" else qwen2_tokenizer()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    if kind == "qwen2":
        tokenizer.chat_template = CHATML  # the LM tokenizer's own (tokenizer_config.json / chat_template.jinja)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                      image_mean=[0.5] * 3, image_std=[0.25] * 3)  # saved in processor_config.json
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                                            vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                            chat_template=LLAVA_15 if kind == "llama" else None)  # fmt: skip
    lm = text_config(kind)
    lm.vocab_size, lm.bos_token_id = backend.get_vocab_size(), backend.token_to_id("<s>")
    lm.eos_token_id, lm.pad_token_id = backend.token_to_id(special["eos_token"]), backend.token_to_id(special["pad_token"])
    config = transformers.LlavaConfig(vision_config=VARIANTS["clip-llama"]["vision"], text_config=lm,
                                      image_token_index=backend.token_to_id("<image>"))  # fmt: skip
    model = randomize(transformers.LlavaForConditionalGeneration(config))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    if kind == "qwen2":
        tokenizer.save_pretrained(directory)
    return model, processor


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def llava(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return (*build(directory, request.param), directory, request.param)


def image(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 36, 3), dtype=np.uint8))


def their_prompt(processor, kind, turns):
    """transformers' apply_chat_template (the processor's template, else the tokenizer's) + processor()."""
    if kind == "llama":
        messages = [{"role": role, "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": text}]}
                    for i, (role, text) in enumerate(turns)]  # fmt: skip
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        messages = [{"role": role, "content": ("<image>\n" if i == 0 else "") + text} for i, (role, text) in enumerate(turns)]
        text = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=image(), text=text, return_tensors="pt")


@pytest.mark.parametrize("turns", [
    [("user", "what colour is the circle?")],
    [("user", "describe the image."), ("assistant", "a blue square and a red star"), ("user", "how many objects are there?")],
])  # fmt: skip
def test_prompt_equals_transformers_apply_chat_template_and_processor(llava, turns):
    _, processor, directory, kind = llava
    model = vlfm.load(directory)
    assert model.tokenizer.chat_template
    ours = [(role, ("<image>\n" if i == 0 else "") + text) for i, (role, text) in enumerate(turns)]
    assert model.prompt_ids(ours, images=1) == their_prompt(processor, kind, turns).input_ids[0].tolist()


def test_chat_answers_as_transformers_generates(llava):
    """LLaVA-1.5 on a Llama tokenizer (no chat tokens) chats; the answer is transformers' greedy one."""
    theirs, processor, directory, kind = llava
    model = vlfm.load(directory)
    inputs = their_prompt(processor, kind, [("user", "what colour is the circle?")])
    with torch.no_grad():
        out = theirs.generate(**inputs, max_new_tokens=6, do_sample=False)
    want = processor.tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()
    assert model.chat(image(), "what colour is the circle?", max_new_tokens=6) == want


def test_template_with_bos_is_not_given_a_second_one(tmp_path):
    """A Llama-3 style template writes bos itself: tokenized without special tokens, as apply_chat_template does."""
    backend, special = llama_tokenizer()
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **special)
    theirs.chat_template = LLAMA3
    theirs.save_pretrained(tmp_path)
    ours = Tokenizer.from_directory(tmp_path)
    turns = [("system", "You are a helpful assistant."), ("user", "  what colour is the circle?  ")]
    want = theirs.apply_chat_template([{"role": r, "content": t} for r, t in turns], add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want  # a BatchEncoding in transformers 5
    assert encode_with_chat_template(turns, ours) == list(want)
    assert encode_with_chat_template(turns, ours).count(backend.token_to_id("<s>")) == 1
    (tmp_path / "saved").mkdir()
    ours.save(tmp_path / "saved" / "tokenizer.json")
    assert Tokenizer.from_directory(tmp_path / "saved").chat_template == LLAMA3


def test_a_broken_template_is_one_usage_error(tmp_path):
    backend, special = llama_tokenizer()
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**special, "chat_template": "{% for m in messages %}"}))
    with pytest.raises(UsageError, match="not valid Jinja"):
        render_chat_template(Tokenizer.from_directory(tmp_path), [("user", "hi")])
