"""The LLaVA-style assistant: projector, image-token splicing, stages (which parameters learn), LoRA,
save/load, chat, the staged run and its CLI, bad input."""

import io
import json
import shutil

import pytest
import torch
from PIL import Image

import vlfm
from vlfm.adapt.lora import add_lora, load_adapter, merge_lora, save_adapter
from vlfm.cli import main
from vlfm.config import ConfigError, StageConfig, load_config
from vlfm.data.shapes import ShapesWorld, WorldConfig
from vlfm.io import CheckpointError
from vlfm.models.projector import Projector, pixel_shuffle
from vlfm.train import run
from vlfm.train.vlm import build_model, set_trainable

TINY_VLM = [
    "task=vlm", "model.vision.image_size=32", "model.vision.patch_size=8", "model.vision.width=32",
    "model.vision.layers=2", "model.vision.heads=2", "model.vision.stem=conv",
    "model.lm.width=32", "model.lm.layers=2", "model.lm.heads=4", "model.lm.kv_heads=2", "model.lm.mlp_width=64",
    "model.lm.vocab_size=300", "model.lm.max_positions=96",
    "data.world.image_size=32", "data.train_size=40", "data.text_size=40", "data.eval_size=4", "data.workers=1",
    "data.max_length=80", "train.eval_every=0", "train.save_every=0", "train.log_every=1",
    "stage0.steps=3", "stage1.steps=3", "stage2.steps=3", "stage0.batch_size=4", "stage1.batch_size=4",
    "stage2.batch_size=4", "stage0.warmup_steps=1", "stage1.warmup_steps=1", "stage2.warmup_steps=1",
]  # fmt: skip


def tiny_vlm_config(tmp_path, *overrides, name="vlm"):
    return load_config(None, TINY_VLM + [f"output_dir={tmp_path}", f"name={name}", *overrides])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    return build_model(tiny_vlm_config(tmp_path_factory.mktemp("vlm"))).eval()


@pytest.fixture(scope="module")
def images():
    world = ShapesWorld(WorldConfig(image_size=32))
    return [world.render(world.scene("val", i)) for i in range(3)]


def test_pixel_shuffle_groups_neighbouring_tokens():
    grid = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid, token value = its index
    out = pixel_shuffle(grid, 2)
    assert out.shape == (1, 4, 4)
    assert out[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    projector = Projector("pixel_shuffle", 8, 16, 2)
    assert projector(torch.randn(2, 16, 8)).shape == (2, 4, 16) and projector.tokens_out(16) == 4


def test_hidden_states_are_the_inner_blocks_output(model):
    vision = model.vision
    pixels = torch.randn(2, 3, 32, 32)
    x = vision.embed(pixels)
    first = vision.transformer.blocks[0](x)
    assert torch.allclose(vision.hidden_states(pixels, -2), first, atol=1e-6)
    assert torch.allclose(vision.hidden_states(pixels, 1), first, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        vision.hidden_states(pixels, 3)


def test_image_features_replace_the_placeholders(model, images):
    ids = torch.tensor([model.prompt_ids([("user", "<image>\nwhat colour is the circle?")], images=1)])
    pixels = model.preprocess(images[:1])
    embeds = model.embed(ids, pixels)
    where = ids[0] == model.config.image_token_id
    assert int(where.sum()) == model.image_tokens == 16
    assert torch.allclose(embeds[0, where], model.image_features(pixels)[0], atol=1e-6)
    assert torch.equal(embeds[0, ~where], model.lm.embed_tokens(ids[0, ~where]))
    with pytest.raises(ValueError, match="16 image-token positions but 2 image"):
        model.embed(ids, model.preprocess(images[:2]))


def test_chat_batch_equals_one_by_one(model, images):
    questions = ["how many shapes are there?", "what colour is the big shape?", "describe the image."]
    batch = model.chat(images, questions, max_new_tokens=5)
    assert batch == [model.chat(i, q, max_new_tokens=5) for i, q in zip(images, questions)]
    assert all(isinstance(a, str) for a in batch)


def test_chat_prompt_puts_the_image_before_the_question_unless_a_turn_holds_it(model):
    assert model.chat_prompt("what shape is it?") == model.prompt_ids([("user", "<image>\nwhat shape is it?")], images=1)
    history = [("user", "<image>\nhow many shapes?"), ("assistant", "two")]
    assert model.chat_prompt("which is red?", history) == model.prompt_ids(history + [("user", "which is red?")], images=1)


def test_chat_bad_input(model, images):
    with pytest.raises(ValueError, match="pass one"):
        model.chat(None, "what shape is it?")
    with pytest.raises(ValueError, match="placeholder"):
        model.chat(images[0], "<image> <image> two images?")
    with pytest.raises(ValueError, match="max_positions"):
        model.chat(images[0], "how many " * 60)


def test_an_assistant_without_tokenizer_is_a_user_error(tmp_path, model, images, capsys):
    """A saved assistant with no tokenizer.json: the API raises CheckpointError saying what to do, and
    `vlfm chat` prints it as one line, exit 2."""
    type(model)(model.config).save(tmp_path / "m")  # no tokenizer attached, so none saved
    bare = vlfm.load(tmp_path / "m")
    assert bare.tokenizer is None
    with pytest.raises(CheckpointError, match="no tokenizer, so it cannot read a prompt.*save the model with its tok"):
        bare.chat(images[0], "what shape is it?")
    images[0].save(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "m"), "--image", str(tmp_path / "x.png"), "--prompt", "what shape?"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no tokenizer, so it cannot read a prompt" in err and "Traceback" not in err


@pytest.mark.parametrize("stage, stage_config, learns", [
    (0, StageConfig(), {"lm"}),
    (1, StageConfig(), {"projector"}),
    (2, StageConfig(), {"projector", "lm"}),
    (2, StageConfig(vision_lr=1e-4), {"projector", "lm", "vision"}),
    (2, StageConfig(lora_rank=4), {"projector", "lm.lora"}),
])  # fmt: skip
def test_which_parameters_learn_in_each_stage(tmp_path, images, stage, stage_config, learns):
    torch.manual_seed(0)
    model = build_model(tiny_vlm_config(tmp_path)).train()
    set_trainable(model, stage, stage_config)
    ids = torch.tensor([model.prompt_ids([("user", "<image>\nhi")], images=1)])
    model(ids, model.preprocess(images[:1])).float().pow(2).mean().backward()
    got = set()
    for name, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            part = name.split(".")[0]
            got.add("lm.lora" if "lora_" in name else part)
        if p.grad is not None:
            assert p.requires_grad
    assert got == learns


def test_lora_merge_and_adapter_round_trip(tmp_path, images):
    torch.manual_seed(0)
    config = tiny_vlm_config(tmp_path)
    model = build_model(config).eval()
    model.save(tmp_path / "base")
    add_lora(model.lm, 4, 16.0, StageConfig().lora_targets)
    with torch.no_grad():  # LoRA's B starts at zero: give it weights so the adapter changes the output
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    ids = torch.tensor([model.prompt_ids([("user", "<image>\nhi")], images=1)])
    pixels = model.preprocess(images[:1])
    with torch.no_grad():
        unmerged = model(ids, pixels)
        save_adapter(model.lm, tmp_path / "adapter")
        merge_lora(model.lm)
        merged = model(ids, pixels)
        reloaded_model = vlfm.load(tmp_path / "base")
        load_adapter(reloaded_model.lm, tmp_path / "adapter")
        reloaded = reloaded_model(ids, pixels)
        base = vlfm.load(tmp_path / "base")(ids, pixels)
    assert not any("lora" in k for k in model.state_dict())
    assert torch.allclose(unmerged, merged, atol=1e-5) and torch.allclose(merged, reloaded, atol=1e-5)
    assert not torch.allclose(merged, base, atol=1e-3)


def test_save_load_round_trip(tmp_path, model, images):
    model.save(tmp_path / "m")
    loaded = vlfm.load(tmp_path / "m")
    assert type(loaded).__name__ == "VisionLanguageModel"
    assert loaded.config == model.config and loaded.tokenizer.vocab_size == model.tokenizer.vocab_size
    ids = torch.tensor([model.prompt_ids([("user", "<image>\nhi")], images=1)])
    pixels = model.preprocess(images[:1])
    with torch.no_grad():
        assert torch.equal(model(ids, pixels), loaded(ids, pixels))
    assert loaded.chat(images[0], "hi", max_new_tokens=4) == model.chat(images[0], "hi", max_new_tokens=4)


def test_staged_run_cli_chat_eval_and_stage_rerun(tmp_path, capsys, monkeypatch):
    config = tiny_vlm_config(tmp_path)
    metrics = run(config)
    run_dir = config.run_dir
    assert {"stage0", "stage1", "stage2", "model", "eval.json"} <= {p.name for p in run_dir.iterdir()}
    assert 0.0 <= metrics["vqa_acc"] <= 1.0 and "vqa_heldout_acc" in metrics
    assert all(0.0 <= metrics[f"vqa_{name}_acc"] <= 1.0 for name in ("wordings", "ood"))  # held-out wordings, renderer
    assert json.loads((run_dir / "eval.json").read_text())["vqa_acc"] == metrics["vqa_acc"]
    losses = [json.loads(x)["loss"] for x in (run_dir / "stage2" / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    assert len(losses) == 3
    image = tmp_path / "scene.png"
    ShapesWorld(WorldConfig(image_size=32)).render(ShapesWorld(WorldConfig(image_size=32)).scene("val", 7)).save(image)
    capsys.readouterr()
    assert main(["chat", str(run_dir), "--image", str(image), "--prompt", "how many shapes are there?"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer == vlfm.load(run_dir).chat(Image.open(image).convert("RGB"), "how many shapes are there?")
    monkeypatch.setattr("sys.stdin", io.StringIO("how many shapes are there?\nwhat colour is the big shape?\n\n"))
    assert main(["chat", str(run_dir), "--image", str(image)]) == 0  # interactive: one question per line
    assert capsys.readouterr().out.count("assistant: ") == 2
    assert main(["chat", str(run_dir), "--scene", "3", "--save", str(tmp_path / "s.png")]) == 0
    transcript = capsys.readouterr().out
    assert (tmp_path / "s.png").is_file() and "you: how many shapes are there?" in transcript
    assert transcript.count("assistant: ") == int(transcript.split("/")[-1].split()[0])  # every question answered
    assert main(["eval", str(run_dir), "--vqa-size", "3", "--csv", str(tmp_path / "r.csv")]) == 0
    assert {"vqa_acc", "vqa_wordings_acc", "vqa_ood_acc"} <= set(json.loads((run_dir / "eval.json").read_text()))
    assert main(["info", str(run_dir)]) == 0
    assert "vision-language model" in capsys.readouterr().out
    # stage 2 again from the saved stage-1 model, under another name: refused without --resume in the same dir
    with pytest.raises(ConfigError, match="--resume"):
        run(config, stage=2)
    # a stage goes on from the earlier stage's saved model: a run config that describes another model is refused
    shutil.copytree(run_dir / "stage1", tmp_path / "other" / "stage1")
    with pytest.raises(ConfigError, match=r"model.feature_layer=-1 \(it has -2\)"):
        run(tiny_vlm_config(tmp_path, "model.feature_layer=-1", name="other"), stage=2)
    with pytest.raises(ConfigError, match=r"model.lm.layers=1 \(it has"):  # the LM's shape too, not only the links
        run(tiny_vlm_config(tmp_path, "model.lm.layers=1", name="other"), stage=2)


def test_stage_needs_the_earlier_stage(tmp_path):
    with pytest.raises(ConfigError, match="earlier stages"):
        run(tiny_vlm_config(tmp_path, name="fresh"), stage=2)


def test_pretrained_lm_keeps_its_weights_and_gains_the_chat_tokens(tmp_path, model):
    from vlfm.config import LMConfig
    from vlfm.data.tokenizer import Tokenizer
    from vlfm.models.lm import LanguageModel

    tokenizer = Tokenizer.train(["a red circle", "how many shapes are there", "a blue square"] * 20, vocab_size=280)
    config = LMConfig(vocab_size=tokenizer.vocab_size, width=32, layers=2, heads=4, kv_heads=2, mlp_width=64,
                      max_positions=96, pad_token_id=tokenizer.pad_id, eos_token_id=tokenizer.eos_id)
    torch.manual_seed(1)
    LanguageModel(config, tokenizer).save(tmp_path / "lm")
    lm = vlfm.load(tmp_path / "lm")
    assert main(["info", str(tmp_path / "lm")]) == 0
    vlm = build_model(tiny_vlm_config(tmp_path, f"model.lm_init={tmp_path / 'lm'}"))
    n = lm.config.vocab_size
    assert vlm.lm.config.vocab_size == vlm.tokenizer.vocab_size > n  # markers and <image> appended
    assert torch.equal(vlm.lm.embed_tokens.weight[:n], lm.embed_tokens.weight)
    assert torch.equal(vlm.lm.blocks[1].mlp.down_proj.weight, lm.blocks[1].mlp.down_proj.weight)
    assert vlm.config.image_token_id == vlm.tokenizer.token_id("<image>") >= n
    with pytest.raises(ConfigError, match="data.max_length=120 exceeds the LM's context length max_positions=96"):
        run(tiny_vlm_config(tmp_path, f"model.lm_init={tmp_path / 'lm'}", "data.max_length=120", name="long"))
    assert not (tmp_path / "long" / "stage1").exists()  # before any training
    with pytest.raises(ConfigError, match="not an image-text model"):
        build_model(tiny_vlm_config(tmp_path, f"model.vision_init={tmp_path / 'lm'}"))
    model.save(tmp_path / "vlm")
    with pytest.raises(ConfigError, match="not a language model"):
        build_model(tiny_vlm_config(tmp_path, f"model.lm_init={tmp_path / 'vlm'}"))


def test_loss_from_labelled_positions_equals_the_full_logits_loss(model, images):
    from vlfm.data.chat import encode_conversation, expand_image_tokens
    from vlfm.train.vlm import next_token_loss

    conversation = [("user", "<image>\nhow many shapes are there?"), ("assistant", "two"), ("user", "is it big?"),
                    ("assistant", "no")]  # fmt: skip
    ids, labels = encode_conversation(conversation, model.tokenizer, model.template)
    ids, labels = expand_image_tokens(ids, labels, model.config.image_token_id, model.image_tokens)
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    pixels, mask = model.preprocess(images[:1]), torch.ones_like(ids)
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(model(ids, pixels, mask)[0, :-1], labels[0, 1:], ignore_index=-100)
        assert torch.allclose(next_token_loss(model, ids, labels, mask, pixels), full, atol=1e-6)
    labelled = labels[labels != -100].tolist()
    assert labelled.count(model.tokenizer.token_id("<|end|>")) == 2  # both replies end with the marker
    assert model.tokenizer.decode(labelled).split() == ["two", "no"]


def test_bf16_autocast_and_gradient_checkpointing_train_the_same_step(tmp_path, images):
    from vlfm.nn import autocast
    from vlfm.train.vlm import next_token_loss

    torch.manual_seed(0)
    model = build_model(tiny_vlm_config(tmp_path)).train()
    set_trainable(model, 2, StageConfig(vision_lr=1e-4))
    ids = torch.tensor([model.prompt_ids([("user", "<image>\nhow many shapes are there?")], images=1)] * 2)
    labels = ids.clone()
    pixels, mask = model.preprocess(images[:2]), torch.ones_like(ids)

    def step(precision, checkpointing):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        with autocast(torch.device("cpu"), precision):
            loss = next_token_loss(model, ids, labels, mask, pixels)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss, grads = step("fp32", False)
    ckpt_loss, ckpt_grads = step("fp32", True)
    assert torch.allclose(loss, ckpt_loss) and torch.allclose(grads, ckpt_grads, atol=1e-6)
    bf16_loss, bf16_grads = step("bf16", True)
    assert abs(float(bf16_loss) - float(loss)) < 0.05 * float(loss) and torch.isfinite(bf16_grads).all()
    assert torch.nn.functional.cosine_similarity(bf16_grads, grads, dim=0) > 0.98


def test_training_on_a_llava_json_file_skips_and_counts_bad_records(tmp_path, images, caplog):
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    good = [{"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nhow many shapes are there?"},
                                                    {"from": "gpt", "value": "two"}]} for i in range(3)]  # fmt: skip
    records = good + [{"image": "broken.png", "conversations": good[0]["conversations"]},  # undecodable
                      {"image": "0.png"},  # no conversations
                      {"conversations": [{"from": "human", "value": "a text-only turn"}, {"from": "gpt", "value": "ok"}]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    config = tiny_vlm_config(tmp_path, f"data.source={tmp_path / 'data.json'}", "stage0.steps=0")
    with caplog.at_level("INFO", logger="vlfm"):
        metrics = run(config)
    assert metrics == {}  # VQA is the built-in world's benchmark; a JSON source has none
    assert any("4 conversations, 3 images, 2 records skipped" in r.getMessage() for r in caplog.records)
    assert (config.run_dir / "model" / "model.safetensors").is_file()
    with pytest.raises(ConfigError, match="unknown role"):
        (tmp_path / "bad.json").write_text(json.dumps([{"conversations": [{"from": "robot", "value": "hi"}]}]))
        run(tiny_vlm_config(tmp_path, f"data.source={tmp_path / 'bad.json'}", "stage0.steps=0", name="bad"))


def test_image_position_embedding_learns_with_the_projector(tmp_path, images):
    torch.manual_seed(0)
    model = build_model(tiny_vlm_config(tmp_path, "model.image_pos_embed=true")).train()
    set_trainable(model, 1, StageConfig())
    ids = torch.tensor([model.prompt_ids([("user", "<image>\nhi")], images=1)])
    pixels = model.preprocess(images[:1])
    features = model.image_features(pixels)
    torch.testing.assert_close(features, model.projector(model.vision.hidden_states(pixels, -2)) + model.image_pos)
    model(ids, pixels).float().pow(2).mean().backward()
    learned = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert learned == {"projector", "image_pos"}


def test_image_position_code_names_row_and_column():
    from vlfm.models.vlm import sincos_2d

    code = sincos_2d(4, 24)[0].reshape(4, 4, 24)  # (row, col, channel)
    rows, cols = code[..., :12], code[..., 12:]
    assert torch.equal(rows, rows[:, :1].expand_as(rows)) and torch.equal(cols, cols[:1].expand_as(cols))
    flat = code.reshape(16, 24)
    distances = torch.cdist(flat, flat) + torch.eye(16) * 1e3
    assert distances.min() > 0.1  # every token's code differs from every other's
    assert 0.5 < flat.pow(2).mean().sqrt() < 1.0  # the scale of the projected features, not of token embeddings


def test_length_buckets_change_the_padding_not_the_loss_or_gradients(tmp_path):
    """data.length_buckets=4: the step's sequences run in 4 pieces sorted by length, each padded to its own
    longest; the loss (mean over every labelled token of the step) and the gradients equal one padded batch's."""
    from vlfm.train.vlm import VLMTask, stage_examples

    config = tiny_vlm_config(tmp_path, "stage2.batch_size=8", "stage2.vision_lr=1e-4")
    model = build_model(config).train()  # the vision tower learns too: its BatchNorm uses batch statistics
    examples = stage_examples(model, config, 2)
    results = []
    for buckets in (1, 4):
        config.data.length_buckets = buckets
        task = VLMTask(model, 2, examples, config)
        model.train()
        pieces = task.batch(1, 0)
        model.zero_grad()
        loss, _ = task.loss(pieces)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((pieces, loss.item(), grads))
    (one, loss1, grads1), (four, loss4, grads4) = results
    assert len(one) == 1 and len(four) == 4
    assert sum(p["ids"].numel() for p in four) < one[0]["ids"].numel()  # less padding
    assert sum(len(p["ids"]) for p in four) == len(one[0]["ids"]) == 8
    assert loss4 == pytest.approx(loss1, rel=1e-5)
    assert grads1.keys() == grads4.keys() and any(name.startswith("vision.") for name in grads1)
    for name in grads1:
        torch.testing.assert_close(grads4[name], grads1[name], rtol=1e-4, atol=1e-6)
