"""The assistant's commands: `vlfm chat`, and what `vlfm eval` / `vlfm info` do for a VLM checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

from vlfm.cli.common import (
    add_max_pixels,
    non_negative_float,
    non_negative_int,
    open_unit_float,
    output_home,
    positive_int,
    text,
)
from vlfm.io import UsageError, open_image


def add_chat(p) -> None:
    p.add_argument("checkpoint", help="a VLM run or checkpoint directory (configs/shapes-vlm.yaml trains one)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="the image to talk about")
    source.add_argument("--scene", type=non_negative_int, metavar="N",
                        help="render scene N of the built-in world's unseen split (saved as --save), ask its questions "
                             "and print each answer beside the truth")  # fmt: skip
    p.add_argument("--save", default="scene.png", help="--scene: where the rendered image is written")
    p.add_argument("--prompt", type=text, help="ask this once and exit (default: read questions from stdin until empty/EOF)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=open_unit_float, default=1.0)
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (temperature > 0)")
    add_max_pixels(p, "--image: an image")


def chat_command(args) -> None:
    import torch

    from vlfm.checkpoint import load
    from vlfm.models import VisionLanguageModel

    model = load(args.checkpoint)
    if not isinstance(model, VisionLanguageModel):
        raise UsageError(f"chat needs a vision-language model; {args.checkpoint} is a {type(model).__name__}")
    if args.scene is not None:
        return _chat_about_scene(model, args)
    image = open_image(args.image, args.max_pixels, model.config.vision.image_size)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "generator": torch.Generator().manual_seed(args.seed)}  # fmt: skip
    history: list[tuple[str, str]] = []
    questions = [args.prompt] if args.prompt else _stdin_questions()
    for question in questions:
        try:
            answer = model.chat(image, question, history=history, **options)
        except ValueError as error:  # e.g. the conversation outgrew the context
            raise UsageError(str(error)) from None
        if args.prompt is None:
            print(f"assistant: {answer}")
        else:
            print(answer)
        if not history:
            question = f"{model.config.image_token}\n{question}"
        history += [("user", question), ("assistant", answer)]


def _chat_about_scene(model, args) -> None:
    """A transcript about a world scene never used in training ('val' scenes past the evaluation's): every
    question the world can answer about it, the model's answer and the truth."""
    from vlfm.data.chat import exact_match
    from vlfm.data.shapes import ShapesWorld, WorldConfig
    from vlfm.data.world_text import questions

    world = ShapesWorld(WorldConfig(image_size=model.config.vision.image_size))
    scene = world.scene("val", 100_000 + args.scene)
    image = world.render(scene)
    image.save(args.save)
    print(f"scene {args.scene} -> {args.save}: " + ", ".join(f"{o.size} {o.label} at ({o.x:.2f}, {o.y:.2f})" for o in scene.objects))
    pairs = [(args.prompt, None)] if args.prompt else questions(scene)
    answers = model.chat([image] * len(pairs), [q for q, _ in pairs], max_new_tokens=args.max_new_tokens)
    right = 0
    for (question, truth), answer in zip(pairs, answers):
        mark = "" if truth is None else ("  ok" if exact_match(answer, truth) else f"  WRONG (truth: {truth})")
        right += truth is not None and exact_match(answer, truth)
        print(f"you: {question}\nassistant: {answer}{mark}")
    if not args.prompt:
        print(f"{right}/{len(pairs)} answered correctly")


def _stdin_questions():
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you: ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        yield line.strip()


def eval_vlm(model, args, path: Path) -> tuple[dict, Path]:
    """VQA exact match on the built-in world (the run's own world when `path` is a run directory)."""
    import yaml

    from vlfm.config import VLMRunConfig, from_dict
    from vlfm.data.shapes import WorldConfig
    from vlfm.train.vlm import evaluate_vlm

    run_config = path / "config.yaml"
    if run_config.is_file():
        config = from_dict(VLMRunConfig, yaml.safe_load(run_config.read_text()))
    else:
        config = VLMRunConfig()
        config.data.world = WorldConfig(image_size=model.config.vision.image_size)
    config.data.eval_size = args.vqa_size
    metrics = evaluate_vlm(model, config)
    default_dir = path if run_config.is_file() else output_home(path)
    return metrics, Path(args.out) if args.out else default_dir / "eval.json"


def describe(model, count) -> None:
    """`vlfm info` for a VisionLanguageModel or a bare LanguageModel."""
    from vlfm.models import LanguageModel

    if isinstance(model, LanguageModel):
        lm = model.config
        print(f"kind: language model  parameters: {count(model) / 1e6:.2f}M  width {lm.width} x {lm.layers} layers, "
              f"{lm.heads} heads ({lm.kv_heads} kv), context {lm.max_positions}, vocab {lm.vocab_size}")
        return
    c = model.config
    v, lm = c.vision, c.lm
    print(f"kind: vision-language model  parameters: {count(model) / 1e6:.2f}M  template: {c.template}")
    print(f"vision: {v.image_size}px patch {v.patch_size} width {v.width} x {v.layers} layers, features of layer "
          f"{c.feature_layer} ({count(model.vision) / 1e6:.2f}M)")
    print(f"projector: {c.projector}, {model.image_tokens} image tokens ({count(model.projector) / 1e6:.3f}M)")
    print(f"lm: width {lm.width} x {lm.layers} layers, {lm.heads} heads ({lm.kv_heads} kv), context {lm.max_positions}, "
          f"vocab {lm.vocab_size} ({count(model.lm) / 1e6:.2f}M)")


