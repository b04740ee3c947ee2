"""Train the bundled demo model: a small Llama that writes like Shakespeare.

This script reproduces every file of ``models/demo/`` from the public-domain
text ``tinyshakespeare.txt`` beside it (1.1 MB, 40k lines of Shakespeare's
plays, the "tiny shakespeare" set of Karpathy's char-rnn):

1. split the text: the last ~5% (cut at a speech boundary) is held out;
2. train a byte-level BPE tokenizer on the training part (``tokenizers``,
   CPU, deterministic) with the special tokens a chat server needs;
3. train ``transformers.LlamaForCausalLM`` from scratch with plain PyTorch
   (AdamW, warmup + cosine LR, bf16 autocast on a GPU, residual dropout),
   evaluating the held-out loss every ``--eval-every`` steps and keeping the
   weights with the lowest one;
4. write a Hugging Face directory (config, safetensors in float32, tokenizer,
   ChatML chat template, generation defaults) and print a greedy sample.

Training rows are 256 tokens, each starting with ``<|begin_of_text|>``. A
quarter of the rows are ChatML conversations built from consecutive speeches
of the play (user speaks one, assistant answers with the next), so that the
chat endpoint gets an in-character answer that ends with ``<|im_end|>``.

The defaults are the settings that made the shipped weights (about 20 s on
one H200, see train_metrics.json). A CPU smoke test: ``--device cpu --steps 5
--batch-size 4 --seq-len 64``. Usage::

    python models/demo/train.py --out models/demo --device cuda
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

DEMO_DIR = Path(__file__).resolve().parent
BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]  # ids 0, 1, 2, 3
VOCAB_SIZE = 4096
MAX_POSITIONS = 1024

# ChatML, with the BOS token first (tokenization of a rendered chat adds no specials).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- data


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Hold out the tail of the text, cut at the blank line that ends a speech."""
    cut_chars = text.rfind("\n\n", 0, int(len(text) * (1.0 - val_fraction))) + 2
    return text[:cut_chars], text[cut_chars:]


def speeches(text: str) -> list[str]:
    """Speech bodies ("NAME:\\nline\\nline") without the speaker line."""
    bodies = []
    for block in text.split("\n\n"):
        lines = block.strip().split("\n")
        if len(lines) >= 2 and lines[0].endswith(":"):
            bodies.append("\n".join(lines[1:]).strip())
    return bodies


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The same string CHAT_TEMPLATE renders (checked by tests/models/test_demo.py)."""
    turns = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return BOS + turns + (f"{IM_START}assistant\n" if add_generation_prompt else "")


def chat_conversations(train_text: str, seed: int) -> list[str]:
    """Consecutive speeches as user/assistant turns, 1-2 exchanges per conversation."""
    rng = random.Random(seed)
    bodies = speeches(train_text)
    conversations, i = [], 0
    while True:
        num_turns = 2 * rng.randint(1, 2)
        if i + num_turns > len(bodies):
            return conversations
        roles = ["user", "assistant"] * (num_turns // 2)
        turns = bodies[i : i + num_turns]
        conversations.append(render_chat([{"role": r, "content": c} for r, c in zip(roles, turns)]))
        i += num_turns


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(train_text: str, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE (GPT-2 style byte alphabet, so every string round-trips)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([train_text], trainer)
    # encode(text) with special tokens on prepends BOS, as Llama 3 does.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)]
    )
    return tokenizer


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of text as written (special-token strings in it are matched)."""
    return tokenizer.encode(text, add_special_tokens=False).ids


# ----------------------------------------------------------------------------- model


def make_model(vocab_size: int, seed: int) -> LlamaForCausalLM:
    """6 layers, hidden 256, 8 query heads / 2 KV heads of dim 32: 5.0M parameters."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=640,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def add_residual_dropout(model: LlamaForCausalLM, p: float) -> None:
    """Dropout on the embedding and on each branch added to the residual stream
    (nanoGPT's placement). Forward hooks leave the saved model untouched."""

    def drop(module: torch.nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return F.dropout(output, p, module.training)

    model.model.embed_tokens.register_forward_hook(drop)
    for layer in model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(drop)
        layer.mlp.register_forward_hook(drop)


# ----------------------------------------------------------------------------- batches


class Batches:
    """Random training rows of seq_len + 1 tokens: BOS + a window of the text, or
    a window of the chat stream that starts at a conversation's BOS."""

    def __init__(self, train_ids: list[int], chat_ids: list[int], chat_starts: list[int],
                 seq_len: int, device: torch.device, seed: int) -> None:
        self.seq_len = seq_len
        self.text_ids = torch.tensor(train_ids, dtype=torch.long, device=device)
        self.chat_ids = torch.tensor(chat_ids, dtype=torch.long, device=device)
        usable = [s for s in chat_starts if s + seq_len + 1 <= len(chat_ids)]
        self.chat_starts = torch.tensor(usable, dtype=torch.long, device=device)
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = torch.arange(seq_len + 1, device=device)

    def sample(self, batch_size: int, chat_fraction: float) -> torch.Tensor:
        """[batch_size, seq_len + 1] int64 rows."""
        num_chat = round(batch_size * chat_fraction)
        num_text = batch_size - num_chat
        text_starts = torch.randint(0, len(self.text_ids) - self.seq_len, (num_text,), generator=self.generator)
        text_rows = self.text_ids[text_starts.to(self.text_ids.device)[:, None] + self.offsets[None, :-1]]
        bos = torch.zeros(num_text, 1, dtype=torch.long, device=text_rows.device)
        rows = [torch.cat([bos, text_rows], dim=1)]
        if num_chat:
            pick = torch.randint(0, len(self.chat_starts), (num_chat,), generator=self.generator)
            starts = self.chat_starts[pick.to(self.chat_starts.device)]
            rows.append(self.chat_ids[starts[:, None] + self.offsets[None, :]])
        return torch.cat(rows, dim=0)


def fixed_rows(ids: list[int], seq_len: int, max_rows: int, device: torch.device) -> torch.Tensor:
    """Evenly spaced, non-overlapping BOS + seq_len windows: [num_rows, seq_len + 1]."""
    num_windows = len(ids) // seq_len
    stride = max(1, num_windows // max_rows)
    rows = [[0] + ids[w * seq_len : (w + 1) * seq_len] for w in range(0, num_windows, stride)][:max_rows]
    return torch.tensor(rows, dtype=torch.long, device=device)


def next_token_loss(model: LlamaForCausalLM, rows: torch.Tensor, autocast: bool) -> torch.Tensor:
    """Mean cross-entropy (nats/token) of predicting rows[:, 1:] from rows[:, :-1]."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=rows[:, :-1]).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, rows: torch.Tensor, autocast: bool, rows_per_pass: int = 32) -> float:
    model.eval()
    losses = [next_token_loss(model, rows[i : i + rows_per_pass], autocast).item() * len(rows[i : i + rows_per_pass])
              for i in range(0, len(rows), rows_per_pass)]
    model.train()
    return sum(losses) / len(rows)


def learning_rate(step: int, total_steps: int, peak_lr: float, warmup_steps: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- output


def save_hf_dir(model: LlamaForCausalLM, tokenizer: Tokenizer, out: Path) -> None:
    """config.json + model.safetensors (float32) + tokenizer + generation defaults."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=0, eos_token_id=[1, 3], pad_token_id=1,
        do_sample=True, temperature=0.8, top_p=0.95, top_k=50, max_new_tokens=256,
    )
    model.to(torch.float32).save_pretrained(out)
    tokenizer.save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "additional_special_tokens": [IM_START, IM_END]}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


@torch.no_grad()
def greedy_sample(model: LlamaForCausalLM, tokenizer: Tokenizer, prompt: str, num_tokens: int,
                  device: torch.device) -> str:
    model.eval()
    ids = torch.tensor([[0] + encode(tokenizer, prompt)], device=device)
    out = model.generate(ids, max_new_tokens=num_tokens, do_sample=False, eos_token_id=[1, 3], pad_token_id=1)
    return tokenizer.decode(out[0, 1:].tolist(), skip_special_tokens=False)


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the HF model into")
    parser.add_argument("--data", type=Path, default=DEMO_DIR / "tinyshakespeare.txt")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=0.5)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--chat-fraction", type=float, default=0.25)
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--eval-every", type=int, default=50)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    autocast = device.type == "cuda"
    start_s = time.perf_counter()

    train_text, val_text = split_text(args.data.read_text(encoding="utf-8"), args.val_fraction)
    tokenizer = train_tokenizer(train_text)
    train_ids, val_ids = encode(tokenizer, train_text), encode(tokenizer, val_text)
    chat_ids, chat_starts = [], []
    for conversation in chat_conversations(train_text, args.seed):
        chat_starts.append(len(chat_ids))
        chat_ids += encode(tokenizer, conversation)
    print(f"tokenizer: vocab {tokenizer.get_vocab_size()}, train {len(train_ids)} tokens "
          f"({len(train_text) / len(train_ids):.2f} chars/token), val {len(val_ids)} tokens, "
          f"chat {len(chat_starts)} conversations / {len(chat_ids)} tokens ({time.perf_counter() - start_s:.1f} s)")

    model = make_model(tokenizer.get_vocab_size(), args.seed).to(device)
    add_residual_dropout(model, args.dropout)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"model: {num_params / 1e6:.2f}M parameters")

    batches = Batches(train_ids, chat_ids, chat_starts, args.seq_len, device, args.seed)
    val_rows = fixed_rows(val_ids, args.seq_len, 128, device)
    train_rows = fixed_rows(train_ids, args.seq_len, 128, device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )

    best = {"val_loss": float("inf"), "train_loss": float("nan"), "step": 0, "state": None}
    train_start_s = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, args.steps, args.lr, args.warmup_steps)
        loss = next_token_loss(model, batches.sample(args.batch_size, args.chat_fraction), autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            val_loss = evaluate(model, val_rows, autocast)
            train_loss = evaluate(model, train_rows, autocast)
            if val_loss < best["val_loss"]:
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best = {"val_loss": val_loss, "train_loss": train_loss, "step": step, "state": state}
            ms_per_step = 1e3 * (time.perf_counter() - train_start_s) / step
            print(f"step {step:5d}  lr {group['lr']:.2e}  batch loss {loss.item():.3f}  "
                  f"train {train_loss:.3f}  val {val_loss:.3f}  ({ms_per_step:.1f} ms/step)", flush=True)

    model.load_state_dict(best["state"])
    save_hf_dir(model, tokenizer, args.out)
    metrics = {
        "best_step": best["step"], "val_loss": round(best["val_loss"], 4), "train_loss": round(best["train_loss"], 4),
        "num_params": num_params, "device": torch.cuda.get_device_name(device) if autocast else "cpu",
        "total_s": round(time.perf_counter() - start_s, 1),
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "data", "device")},
    }
    print("best:", json.dumps(metrics))
    (args.out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print("greedy sample:\n" + greedy_sample(model, tokenizer, "ROMEO:\n", 60, device))


if __name__ == "__main__":
    main()
