"""Train the bundled vision demo: a tiny Qwen2.5-VL that answers questions about shapes.

This script reproduces every file of ``models/demo-vl/`` from pictures it draws
itself, so nothing is downloaded:

1. **Scenes.** A 140x140 canvas with 1-3 shapes (circle, square, triangle) of
   distinct named colours at distinct places (left, right, top, bottom,
   centre), with a little jitter in place and size and a mid-grey background.
   Each place is the centre of one 28x28 merged image token and a shape stays
   inside that square, so one image token holds one whole shape.
   Each scene answers four kinds of question with one word or number:
   "How many shapes are there?" -> ``2``, "What colour is the circle?" ->
   ``red``, "What shape is blue?" -> ``square``, "Where is the red circle?"
   -> ``left``.
2. **Tokenizer.** Byte-level BPE trained with ``tokenizers`` on the generated
   questions and answers, with Qwen's special tokens first (``<|endoftext|>``,
   ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>``,
   ``<|image_pad|>``, ``<|video_pad|>``) and a ChatML template that renders an
   image part as ``<|vision_start|><|image_pad|><|vision_end|>`` as
   Qwen2.5-VL's does.
3. **Pixels.** Qwen's preprocessing, written out here for the fixed canvas (no
   resize is needed: 140 is a multiple of patch 14 x merge 2): scale to [0, 1],
   normalise with the CLIP mean/std, repeat the picture over the 2 temporal
   slots and cut it into 10x10 patches of 3x2x14x14 values, merge windows
   outermost. ``preprocessor_config.json`` makes Hugging Face's processor and
   the multimodal stage do the same (checked by tests/models/test_demo_vl.py).
   Each picture becomes 5x5 = 25 ``<|image_pad|>`` tokens.
4. **Model.** ``transformers.Qwen2_5_VLForConditionalGeneration`` from scratch
   (vision tower of 3 blocks, language model of 3 layers), trained with plain
   PyTorch on fresh scenes every step (AdamW, warmup + cosine). The loss is on
   the answer and its ``<|im_end|>`` only. Every ``--eval-every`` steps the
   held-out accuracy is measured by teacher forcing (all answer tokens and
   ``<|im_end|>`` argmax-correct, which is exactly when greedy decoding
   reproduces them), overall and per question kind; the best weights are kept.
5. **Output.** A Hugging Face directory (config, float32 safetensors,
   tokenizer, chat template, preprocessor config, greedy generation defaults)
   and ``train_metrics.json`` with the held-out accuracy of greedy decoding
   with ``transformers.generate`` (one question per held-out scene).

Usage (README.md beside this file gives the commands that made the shipped weights)::

    python models/demo-vl/train.py --out models/demo-vl --threads 1
    python models/demo-vl/train.py --out /tmp/demo-vl --steps 5 --eval-every 5   # smoke test
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- constants

PATCH, MERGE, TEMPORAL = 14, 2, 2
CELL = PATCH * MERGE             # 28 pixels: the square one merged image token covers
GRID = 5                         # merged tokens per side
CANVAS = GRID * CELL             # 140 pixels per side: 10x10 patches of 14, 5x5 merged tokens
IMAGE_TOKENS = GRID ** 2
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]   # Qwen's (OpenAI CLIP's) normalisation
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = range(len(SPECIAL_TOKENS))
VOCAB_SIZE = 512
# The tokenizer's corpus does not follow --seed, so --init-from fits; it is drawn with random_scene, so a change
# to the scene generator changes the token ids and older weights start with their embeddings shuffled.
TOKENIZER_SEED = 1234
MAX_POSITIONS = 2048

COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230),
           "yellow": (240, 200, 20), "purple": (140, 50, 180)}
SHAPES = ["circle", "square", "triangle"]


def _cell_centre(column: int, row: int) -> tuple[int, int]:
    return column * CELL + CELL // 2, row * CELL + CELL // 2


# Each place is the centre of one merged token and a shape stays inside that token's 28x28 square, so one
# image token holds the whole of one shape (its four patches are the shape's four quadrants).
PLACES = {"left": _cell_centre(0, GRID // 2), "right": _cell_centre(GRID - 1, GRID // 2),
          "top": _cell_centre(GRID // 2, 0), "bottom": _cell_centre(GRID // 2, GRID - 1),
          "centre": _cell_centre(GRID // 2, GRID // 2)}
MIN_HALF_SIZE, MAX_HALF_SIZE = 9, 12
QUESTION_KINDS = ["count", "colour", "shape", "where"]

# ChatML; an image or video part becomes its placeholder (the multimodal stage expands
# <|image_pad|> to one pad per merged token). A string content is written as it is.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Item:
    shape: str
    colour: str
    place: str


@dataclass(frozen=True)
class Scene:
    items: tuple[Item, ...]
    background: tuple[int, int, int]
    jitter: tuple[tuple[int, int, int], ...]     # per item: dx, dy, half-size


def random_scene(rng: random.Random) -> Scene:
    """1-3 shapes, each of its own kind, colour and place."""
    count = rng.randint(1, 3)
    shapes = rng.sample(SHAPES, count)
    colours = rng.sample(list(COLOURS), count)
    places = rng.sample(list(PLACES), count)
    items = tuple(Item(s, c, p) for s, c, p in zip(shapes, colours, places))
    # a mid grey near the normalisation mean: background patches normalise to about 0, so the shapes stand out
    grey = rng.randint(105, 135)
    background = tuple(grey + rng.randint(-6, 6) for _ in range(3))
    jitter = tuple(_jitter(rng) for _ in items)
    return Scene(items, background, jitter)  # type: ignore[arg-type]


def _jitter(rng: random.Random) -> tuple[int, int, int]:
    """(dx, dy, half-size): as far off the centre as keeps the shape 1 pixel inside its token's square."""
    half = rng.randint(MIN_HALF_SIZE, MAX_HALF_SIZE)
    room = CELL // 2 - 1 - half
    return rng.randint(-room, room), rng.randint(-room, room), half


def draw(scene: Scene) -> Image.Image:
    """The scene as a CANVAS x CANVAS RGB picture."""
    image = Image.new("RGB", (CANVAS, CANVAS), scene.background)
    pen = ImageDraw.Draw(image)
    for item, (dx, dy, r) in zip(scene.items, scene.jitter):
        x, y = PLACES[item.place][0] + dx, PLACES[item.place][1] + dy
        fill = COLOURS[item.colour]
        if item.shape == "circle":
            pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif item.shape == "square":
            pen.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:
            pen.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return image


def ask(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """(question, one-word answer) of the given kind about the scene."""
    item = rng.choice(scene.items)
    colour_word = rng.choice(["colour", "color"])
    if kind == "count":
        question = rng.choice(["How many shapes are there?", "How many shapes are in the picture?"])
        return question, str(len(scene.items))
    if kind == "colour":
        return f"What {colour_word} is the {item.shape}?", item.colour
    if kind == "shape":
        return rng.choice([f"What shape is {item.colour}?", f"Which shape is {item.colour}?"]), item.shape
    return rng.choice([f"Where is the {item.colour} {item.shape}?", f"Where is the {item.shape}?"]), item.place


def heldout_questions(seed: int, count: int) -> list[tuple[Scene, str, str]]:
    """count (scene, question, answer) triples, one per scene, the four kinds in turn."""
    rng = random.Random(seed)
    triples = []
    for i in range(count):
        scene = random_scene(rng)
        triples.append((scene, *ask(scene, QUESTION_KINDS[i % len(QUESTION_KINDS)], rng)))
    return triples


def user_turn(question: str) -> list[dict]:
    """The chat messages of one question about one picture (picture first, as people write)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def render_prompt(question: str) -> str:
    """The string CHAT_TEMPLATE renders for user_turn(question) plus the generation prompt."""
    return (f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n"
            "<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- pixels


def pixel_patches(images: list[Image.Image]) -> torch.Tensor:
    """Qwen's patches of CANVAS-sided pictures: [n * 100, 3 * 2 * 14 * 14] float32, merge windows outermost."""
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])) / 255.0
    mean, std = torch.tensor(IMAGE_MEAN), torch.tensor(IMAGE_STD)
    pixels = ((pixels - mean) / std).permute(0, 3, 1, 2)                       # [n, 3, H, W]
    frames = pixels[:, None].expand(-1, TEMPORAL, -1, -1, -1)                   # [n, tp, 3, H, W]
    n, side = len(images), CANVAS // PATCH // MERGE
    patches = frames.reshape(n, TEMPORAL, 3, side, MERGE, PATCH, side, MERGE, PATCH)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)                        # [n, h/m, w/m, m, m, C, tp, p, p]
    return patches.reshape(n * (CANVAS // PATCH) ** 2, 3 * TEMPORAL * PATCH * PATCH).contiguous()


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(seed: int = TOKENIZER_SEED):
    """Byte-level BPE over generated questions and answers; Qwen's special tokens get ids 0-6."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    corpus = ["user\n", "assistant\n", "system\n"]
    for _ in range(4000):
        scene = random_scene(rng)
        question, answer = ask(scene, rng.choice(QUESTION_KINDS), rng)
        corpus.append(f"{question} {answer}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def hf_tokenizer(tokenizer):
    """The tokenizers object wrapped for transformers, with the chat template."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def encode_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of render_prompt(question) with <|image_pad|> expanded to one pad per merged token."""
    prompt = tokenizer.encode(render_prompt(question), add_special_tokens=False).ids
    pad_at = prompt.index(IMAGE_PAD)
    return prompt[:pad_at] + [IMAGE_PAD] * IMAGE_TOKENS + prompt[pad_at + 1:]


def encode_conversation(tokenizer, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """(ids, answer mask) of a chat about one picture: the first question comes with the picture, later
    ones follow as the template writes history (``answer<|im_end|>\n<|im_start|>user\n...``). The mask
    marks each answer's tokens and its <|im_end|>. The first turn alone is exactly what a server sees."""
    ids: list[int] = []
    mask: list[int] = []
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            prompt = encode_prompt(tokenizer, question)
        else:
            text = f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
            prompt = tokenizer.encode(text, add_special_tokens=False).ids
        reply = tokenizer.encode(answer, add_special_tokens=False).ids + [IM_END]
        ids += prompt + reply
        mask += [0] * len(prompt) + [1] * len(reply)
    return ids, mask


# ----------------------------------------------------------------------------- model


def make_model(vocab_size: int, seed: int):
    """Vision: 3 blocks of width 64 over 100 patches; language: 3 layers of width 128 (GQA 4/2, dim 32)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
                bos_token_id=IM_START, eos_token_id=IM_END, pad_token_id=ENDOFTEXT,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6]))
    vision = dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                  patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                  window_size=CANVAS, fullatt_block_indexes=[2], tokens_per_second=2)
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, bos_token_id=IM_START,
        eos_token_id=IM_END, pad_token_id=ENDOFTEXT, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config)


# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    input_ids: torch.Tensor        # [B, L] right-padded with <|endoftext|>
    labels: torch.Tensor           # [B, L] next-token targets, -100 outside answers
    pixel_values: torch.Tensor     # [B * 100, 1176]
    grid_thw: torch.Tensor         # [B, 3]


def make_batch(tokenizer, examples: list[tuple[Scene, list[tuple[str, str]]]], device: torch.device) -> Batch:
    """One row per (scene, [(question, answer), ...]); labels[i] is the answer token after position i."""
    rows = [encode_conversation(tokenizer, turns) for _, turns in examples]
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), ENDOFTEXT, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        targets = torch.tensor(ids[1:])
        labels[r, :len(ids) - 1] = torch.where(torch.tensor(mask[1:]) == 1, targets, -100)
    pixels = pixel_patches([draw(scene) for scene, _ in examples])
    grid = torch.tensor([[1, CANVAS // PATCH, CANVAS // PATCH]] * len(rows))
    return Batch(input_ids.to(device), labels.to(device), pixels.to(device), grid.to(device))


def logits_of(model, batch: Batch, autocast: bool) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        return model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, image_grid_thw=batch.grid_thw,
                     mm_token_type_ids=(batch.input_ids == IMAGE_PAD).int()).logits.float()


def answer_loss(model, batch: Batch, autocast: bool) -> torch.Tensor:
    logits = logits_of(model, batch, autocast)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.labels.reshape(-1), ignore_index=-100)


@torch.no_grad()
def teacher_forced_right(model, batches: list[Batch], autocast: bool) -> list[bool]:
    """Per row: is every answer token (and <|im_end|>) the argmax? Exactly when greedy decoding reproduces it."""
    model.eval()
    right: list[bool] = []
    for batch in batches:
        predicted = logits_of(model, batch, autocast).argmax(-1)
        scored = batch.labels != -100
        right += ((predicted == batch.labels) | ~scored).all(dim=1).tolist()
    model.train()
    return right


def by_kind(right: list[bool]) -> dict[str, float]:
    """Accuracy per question kind of held-out rows, whose kinds come in turn (heldout_questions)."""
    kinds = len(QUESTION_KINDS)
    return {kind: round(sum(right[k::kinds]) / max(1, len(right[k::kinds])), 4)
            for k, kind in enumerate(QUESTION_KINDS)}


def learning_rate(step: int, total_steps: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- greedy check and output


@torch.no_grad()
def greedy_answers(model, tokenizer, triples: list[tuple[Scene, str, str]], device: torch.device,
                   max_new_tokens: int = 4) -> list[str]:
    """transformers' greedy generate, one question at a time, decoded without special tokens."""
    model.eval()
    answers = []
    for scene, question, _ in triples:
        ids = encode_prompt(tokenizer, question)
        input_ids = torch.tensor([ids], device=device)
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            pixel_values=pixel_patches([draw(scene)]).to(device),
            image_grid_thw=torch.tensor([[1, CANVAS // PATCH, CANVAS // PATCH]], device=device),
            mm_token_type_ids=(input_ids == IMAGE_PAD).int(), do_sample=False, max_new_tokens=max_new_tokens,
            eos_token_id=IM_END, pad_token_id=ENDOFTEXT)
        answers.append(tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True).strip())
    return answers


def save_hf_dir(model, tokenizer, out: Path) -> None:
    """config + float32 safetensors + tokenizer + chat template + preprocessor + greedy generation defaults."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=IM_START, eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT,
        do_sample=False, max_new_tokens=16)
    model.to(torch.float32).save_pretrained(out)
    hf_tokenizer(tokenizer).save_pretrained(out)
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": IMAGE_MEAN, "image_std": IMAGE_STD,
        # a picture of any size is resized to about 140x140 pixels (25 tokens); 140x140 stays as it is
        "min_pixels": 56 * 56, "max_pixels": CANVAS * CANVAS,
        "patch_size": PATCH, "merge_size": MERGE, "temporal_patch_size": TEMPORAL,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the HF model into")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--batch-size", type=int, default=24, help="pictures per step")
    parser.add_argument("--turns", type=int, default=4, help="questions per picture (a multi-turn chat)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-questions", type=int, default=400, help="held-out questions for teacher forcing")
    parser.add_argument("--greedy-questions", type=int, default=200, help="held-out questions for generate")
    parser.add_argument("--init-from", type=Path, default=None, help="start from this directory's weights")
    parser.add_argument("--stop-at", type=float, default=0.995, help="stop once teacher-forced accuracy reaches it")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = device.type == "cuda"
    start_s = time.perf_counter()

    tokenizer = train_tokenizer()
    if args.init_from is None:
        model = make_model(tokenizer.get_vocab_size(), args.seed)
    else:  # continue from saved weights (the tokenizer is deterministic, so it is the same one)
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(args.init_from), dtype=torch.float32)
        # weights trained on another canvas: attention windows are the whole picture, as make_model's
        model.config.vision_config.window_size = model.model.visual.window_size = CANVAS
    model = model.to(device).train()
    num_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: vocab {tokenizer.get_vocab_size()}; model: {num_params / 1e6:.2f}M parameters")

    # held-out scenes come from their own seeds, training scenes from the main one
    heldout = heldout_questions(args.seed + 1, args.eval_questions)
    eval_batches = [make_batch(tokenizer, [(scene, [(q, a)]) for scene, q, a in heldout[i:i + 100]], device)
                    for i in range(0, len(heldout), 100)]
    rng = random.Random(args.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95))

    best = {"accuracy": -1.0, "step": 0, "state": None}
    history = []
    train_start_s = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, args.steps, args.lr, args.warmup_steps)
        examples = []
        for _ in range(args.batch_size):
            scene = random_scene(rng)
            examples.append((scene, [ask(scene, rng.choice(QUESTION_KINDS), rng) for _ in range(args.turns)]))
        loss = answer_loss(model, make_batch(tokenizer, examples, device), autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            right = teacher_forced_right(model, eval_batches, autocast)
            accuracy, kinds = sum(right) / len(right), by_kind(right)
            history.append({"step": step, "loss": round(loss.item(), 4), "heldout_accuracy": accuracy,
                            "heldout_accuracy_by_kind": kinds})
            if accuracy > best["accuracy"]:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = {"accuracy": accuracy, "step": step, "state": state}
            ms_per_step = 1e3 * (time.perf_counter() - train_start_s) / step
            print(f"step {step:5d}  lr {group['lr']:.2e}  loss {loss.item():.4f}  held-out {accuracy:.3f} "
                  f"{' '.join(f'{k} {v:.2f}' for k, v in kinds.items())}  ({ms_per_step:.0f} ms/step)", flush=True)
            if accuracy >= args.stop_at:
                break

    model.load_state_dict(best["state"])
    train_s = time.perf_counter() - train_start_s
    greedy_set = heldout_questions(args.seed + 2, args.greedy_questions)
    answers = greedy_answers(model, tokenizer, greedy_set, device)
    per_kind: dict[str, list[int]] = {k: [] for k in QUESTION_KINDS}
    for i, ((_, _, expected), got) in enumerate(zip(greedy_set, answers)):
        per_kind[QUESTION_KINDS[i % len(QUESTION_KINDS)]].append(int(got == expected))
    greedy_accuracy = sum(sum(v) for v in per_kind.values()) / len(greedy_set)
    save_hf_dir(model, tokenizer, args.out)
    metrics = {
        "heldout_greedy_accuracy": round(greedy_accuracy, 4),
        "heldout_greedy_accuracy_by_kind": {k: round(sum(v) / max(1, len(v)), 4) for k, v in per_kind.items()},
        "heldout_greedy_questions": len(greedy_set),
        "best_step": best["step"], "teacher_forced_accuracy": round(best["accuracy"], 4),
        "num_params": num_params, "vocab_size": tokenizer.get_vocab_size(),
        "device": torch.cuda.get_device_name(device) if autocast else f"cpu ({args.threads} threads)",
        "train_s": round(train_s, 1), "total_s": round(time.perf_counter() - start_s, 1),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("out", "device")},
        "history": history,
    }
    if args.init_from is not None and (args.init_from / "train_metrics.json").is_file():
        metrics["init_from_metrics"] = json.loads((args.init_from / "train_metrics.json").read_text())
    print("result:", json.dumps({k: v for k, v in metrics.items() if k not in ("history", "init_from_metrics")}))
    (args.out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    for (_, question, expected), got in list(zip(greedy_set, answers))[:8]:
        print(f"  {question!r:45} -> {got!r} (expected {expected!r})")


if __name__ == "__main__":
    main()
