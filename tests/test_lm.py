"""LanguageModel against transformers' Llama / Qwen2 (tiny random models, fp32): same logits, same greedy tokens;
the KV cache, left padding and embedding prefill change nothing; checkpoints load, export and fail clearly."""

import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from vlfm.config import LMConfig
from vlfm.interop.hf_lm import export_hf_lm, hf_lm_config, load_hf_lm
from vlfm.io import CheckpointError, load_state_strict
from vlfm.models.lm import KVCache, LanguageModel

TOL = 1e-4
VOCAB, EOS, PAD = 96, 2, 0

VARIANTS = {
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    # tied head, one kv head, head_dim not width / heads
    "llama_tied": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=1, head_dim=12,
                       tie_word_embeddings=True, rope_theta=500.0),
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}  # fmt: skip


def randomize(model, seed=0):
    """Every parameter random (norm scales and biases too), so a swapped or missed key cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale, shift = (0.3, 1.0) if "norm" in name else (0.1 if p.dim() > 1 else 0.3, 0.0)
            p.copy_(torch.randn(p.shape, generator=g) * scale + shift)
    return model.eval()


def hf_model(variant):
    kw = dict(VARIANTS[variant])
    kind = kw.pop("model_type")
    config_class = transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=EOS,
                          pad_token_id=PAD, **kw)  # fmt: skip
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM
    return randomize(cls(config))


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, the same weights loaded by vlfm from its save_pretrained directory, that directory)."""
    theirs = hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    theirs.save_pretrained(directory)
    return theirs, load_hf_lm(directory), directory


def left_padded(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, ids.shape[1] - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, ids.shape[1] - n :] = 1
    return ids, mask


def until_eos(tokens):
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


def hf_logits(model, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers' forward counts padding unless told
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def test_logits_match_transformers_on_a_left_padded_batch(pair):
    theirs, ours, _ = pair
    ids, mask = left_padded([9, 5, 1])
    with torch.no_grad():
        got = ours(input_ids=ids, attention_mask=mask)
    want = hf_logits(theirs, ids, mask)
    real = mask.bool()
    assert got.shape == (3, 9, VOCAB)
    assert (got[real] - want[real]).abs().max() <= TOL


def test_greedy_generation_matches_transformers(pair):
    theirs, ours, _ = pair
    ids, mask = left_padded([7, 3, 5], seed=1)
    got = ours.generate(ids, mask, max_new_tokens=10)
    want = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD)
    assert got == [until_eos(row) for row in want[:, ids.shape[1] :].tolist()]
    assert sum(map(len, got)) > 0


def test_cache_equals_recomputing_the_whole_sequence(pair):
    _, ours, _ = pair
    ids, mask = left_padded([6, 2], seed=2)
    got = ours.generate(ids, mask, max_new_tokens=8, stop_tokens=[])
    seq, full = ids, mask
    with torch.no_grad():
        for _ in range(8):
            token = ours(input_ids=seq, attention_mask=full)[:, -1].argmax(-1, keepdim=True)
            seq, full = torch.cat([seq, token], 1), torch.cat([full, torch.ones_like(token)], 1)
    assert got == seq[:, ids.shape[1] :].tolist()


def test_cached_forward_logits_equal_one_pass(pair):
    _, ours, _ = pair
    ids, mask = left_padded([8, 4], seed=3)
    cache = KVCache()
    with torch.no_grad():
        whole = ours(input_ids=ids, attention_mask=mask)
        first = ours(input_ids=ids[:, :5], attention_mask=mask[:, :5], cache=cache)
        rest = ours(input_ids=ids[:, 5:], attention_mask=mask, cache=cache)  # several new tokens at once
    assert cache.length == 8
    real = mask.bool()
    assert (torch.cat([first, rest], 1)[real] - whole[real]).abs().max() <= TOL


def test_left_padded_batch_generates_what_each_prompt_generates_alone(pair):
    _, ours, _ = pair
    ids, mask = left_padded([8, 3, 5], seed=4)
    batch = ours.generate(ids, mask, max_new_tokens=6)
    alone = [ours.generate(row[m.bool()][None], max_new_tokens=6)[0] for row, m in zip(ids, mask)]
    assert batch == alone


def test_kv_heads_shared_without_grad_give_the_numbers_of_repeated_ones(pair):
    """Without grad SDPA serves each kv head to its query group; with grad k and v are repeated (for backward)."""
    _, ours, _ = pair
    ids, mask = left_padded([6, 3], seed=8)
    with torch.no_grad():
        shared = ours(input_ids=ids, attention_mask=mask)
    assert torch.equal(shared, ours(input_ids=ids, attention_mask=mask).detach())


def test_embedding_prefill_equals_token_prefill(pair):
    _, ours, _ = pair
    ids, mask = left_padded([5, 7], seed=5)
    embeds = ours.embed_tokens(ids).detach()
    with torch.no_grad():
        assert torch.equal(ours(inputs_embeds=embeds, attention_mask=mask), ours(input_ids=ids, attention_mask=mask))
    assert ours.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6) == ours.generate(ids, mask, max_new_tokens=6)


def test_export_loads_in_transformers_with_the_same_logits(pair, tmp_path):
    _, ours, _ = pair
    model = randomize(LanguageModel(ours.config), seed=7)
    export_hf_lm(model, tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == ("Qwen2ForCausalLM" if ours.config.attn_bias else "LlamaForCausalLM")
    ids, mask = left_padded([6, 4], seed=6)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - hf_logits(theirs, ids, mask)[real]).abs().max() <= TOL
    again = load_hf_lm(tmp_path / "hf")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_safetensors_round_trip_of_a_tied_model(tmp_path):
    model = randomize(LanguageModel(LMConfig(vocab_size=VOCAB, width=32, layers=1, heads=4, kv_heads=2, mlp_width=40)))
    assert "lm_head.weight" not in model.state_dict()
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    loaded = LanguageModel(LMConfig(vocab_size=VOCAB, width=32, layers=1, heads=4, kv_heads=2, mlp_width=40))
    load_state_strict(loaded, load_file(str(tmp_path / "m.safetensors")), "test")
    ids = torch.randint(0, VOCAB, (2, 5))
    assert torch.equal(loaded.eval()(ids), model(ids))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "linear"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"model_type": "mistral"}, "mistral"),
    ],
)
def test_bad_config_is_refused(change, message):
    base = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1e4}  # fmt: skip
    assert hf_lm_config(base).kv_heads == 2
    with pytest.raises(CheckpointError, match=message):
        hf_lm_config({**base, **change})


def test_config_translation():
    qwen = hf_lm_config({"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
                         "intermediate_size": 96, "num_hidden_layers": 3, "vocab_size": 100, "rope_theta": 1e6,
                         "tie_word_embeddings": True, "eos_token_id": [7, 9], "max_position_embeddings": 128})  # fmt: skip
    assert (qwen.attn_bias, qwen.rope_theta, qwen.eos_token_id, qwen.tie_embeddings, qwen.kv_heads) == (True, 1e6, 7, True, 2)
    assert (qwen.width, qwen.layers, qwen.mlp_width, qwen.max_positions, qwen.vocab_size) == (64, 3, 96, 128, 100)


def test_checkpoint_with_a_missing_key_names_it(pair, tmp_path):
    _, _, directory = pair
    broken = shutil.copytree(directory, tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_lm(broken)


def test_unexpected_key_is_refused(pair, tmp_path):
    _, _, directory = pair
    broken = shutil.copytree(directory, tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    state["model.layers.2.mlp.up_proj.weight"] = torch.zeros(1)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected: model\.layers\.2\.mlp\.up_proj\.weight"):
        load_hf_lm(broken)


def tiny_model(**kw):
    return randomize(LanguageModel(LMConfig(vocab_size=VOCAB, width=32, layers=2, heads=4, kv_heads=2, mlp_width=40,
                                            max_positions=24, **kw)))  # fmt: skip


def test_too_long_a_prompt_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"20 tokens \+ max_new_tokens=5 = 25 exceeds .*max_positions=24"):
        model.generate(torch.randint(3, VOCAB, (1, 20)), max_new_tokens=5)
    with pytest.raises(ValueError, match="max_positions=24"):
        model(torch.randint(3, VOCAB, (1, 25)))


def test_sampling_is_seeded_and_tiny_top_p_is_greedy():
    model = tiny_model()
    ids, mask = left_padded([6, 3], seed=8)

    def sample(seed, global_seed, **kw):
        torch.manual_seed(global_seed)  # the global generator must not matter
        return model.generate(ids, mask, max_new_tokens=12, stop_tokens=[], generator=torch.Generator().manual_seed(seed), **kw)

    first = sample(0, 100, temperature=1.5, top_p=0.9)
    assert first == sample(0, 200, temperature=1.5, top_p=0.9)
    assert first != sample(1, 100, temperature=1.5, top_p=0.9)
    greedy = model.generate(ids, mask, max_new_tokens=12, stop_tokens=[])
    assert first != greedy
    assert sample(2, 300, temperature=1.5, top_p=1e-6) == greedy


def test_generation_stops_at_the_stop_token_and_early():
    model = tiny_model()
    ids, mask = left_padded([4, 4], seed=9)
    free = model.generate(ids, mask, max_new_tokens=10, stop_tokens=[])
    stop = free[0][3]
    got = model.generate(ids, mask, max_new_tokens=10, stop_tokens=[stop])
    assert got == [row[: row.index(stop)] if stop in row else row for row in free]
    assert model.generate(ids, mask, max_new_tokens=10, stop_tokens=[free[0][0], free[1][0]]) == [[], []]


def test_resize_keeps_logits_and_tying():
    for tie in (True, False):
        model = tiny_model(tie_embeddings=tie)
        ids = torch.randint(0, VOCAB, (2, 5))
        with torch.no_grad():
            before = model(ids)
        mean = model.embed_tokens.weight.mean(0).detach().clone()
        model.resize_token_embeddings(VOCAB + 3)
        with torch.no_grad():
            after = model(ids)
        assert model.config.vocab_size == VOCAB + 3 and after.shape[-1] == VOCAB + 3
        assert (after[..., :VOCAB] - before).abs().max() <= 1e-6
        assert torch.equal(model.embed_tokens.weight[VOCAB:], mean.expand(3, -1))
        assert (model.lm_head is None) == tie and (tie or model.lm_head.weight.shape[0] == VOCAB + 3)
        assert model.embed_tokens.weight.requires_grad


def test_grad_checkpointing_gives_the_same_gradients():
    model = tiny_model(tie_embeddings=False).train()
    ids, mask = left_padded([6, 4], seed=10)
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.grad_checkpointing = checkpointing
        model(input_ids=ids, attention_mask=mask)[mask.bool()].logsumexp(-1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_bf16_autocast_on_cpu_stays_close_to_fp32():
    model = tiny_model()
    ids, mask = left_padded([6, 4], seed=11)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half.float()[real] - full[real]).abs().max() < 0.1 * full[real].abs().max()


def test_cli_convert_to_hf_reaches_the_language_model_exporter(pair, tmp_path, capsys):
    from vlfm.cli import main

    _, ours, _ = pair
    model = randomize(LanguageModel(ours.config), seed=3)
    model.save(tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids, mask = left_padded([5, 3], seed=4)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - hf_logits(theirs, ids, mask)[real]).abs().max() <= TOL
