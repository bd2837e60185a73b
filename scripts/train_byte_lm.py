"""Train `models/byte-lm`: a small byte-level causal Reformer, on the CPU, through the reversible backward.

The text is the Python source of the CPython standard library's top-level modules (`Lib/*.py`, PSF License,
see LICENSE.txt in the same folder), read from the interpreter that runs this script. Every 20th file (in
name order) is held out. Each file is followed by the EOS token, so the model learns where a module ends.

    python scripts/train_byte_lm.py --output models/byte-lm

reproduces the shipped weights on CPython 3.11.7 with torch 2.13 CPU and 1 thread. It prints the corpus's
SHA-256 and records it in training.json: another Python version gives another corpus, hence other weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from reformer import ReformerConfig, ReformerModelWithLMHead  # noqa: E402
from reformer import tokenizer  # noqa: E402
from reformer.files import write_json_atomically  # noqa: E402

HELD_OUT_EVERY = 20
# Modules generated when Python was built (their content depends on the machine), not written by people.
EXCLUDED_PREFIXES = ("_sysconfigdata",)
SEQUENCE_LENGTH = 1024  # = prod(axial_pos_shape): the reference's axial embeddings train only at that length
TRAINING_RECORD = "training.json"
LOSS_REPORT_EVERY = 50  # steps per progress line; the line shows their mean loss (one batch's is noisy)


def byte_lm_config() -> ReformerConfig:
    """About 1.06M parameters (4.2 MB in fp32): 5 layers, local attention before, between and after two LSH
    layers. An LSH layer attends to the tokens hashed near a token, not to its neighbours: the local layers
    carry the byte-to-byte context, so they are the majority."""
    return ReformerConfig(
        vocab_size=tokenizer.VOCAB_SIZE,
        pad_token_id=tokenizer.PAD_ID,
        eos_token_id=tokenizer.EOS_ID,
        is_decoder=True,
        hidden_size=128,
        num_attention_heads=4,
        attention_head_size=32,
        feed_forward_size=512,
        hidden_act="gelu",
        attn_layers=["local", "lsh", "local", "lsh", "local"],
        local_attn_chunk_length=64,
        lsh_attn_chunk_length=64,
        num_hashes=1,
        hash_seed=1234,
        max_position_embeddings=SEQUENCE_LENGTH,
        axial_pos_embds=True,
        axial_pos_shape=[32, 32],
        axial_pos_embds_dim=[32, 96],
        # The reference's default (1.0) gives position vectors 50 times the size of the word embeddings
        # (std 0.02): the tokens drown, and a short run stalls at the unigram loss (measured: 4.4 against 3.8
        # bits/token after 40 steps of 4 windows with 0.02).
        axial_norm_std=0.02,
        # No dropout: the model sees well under one pass over the text in its training budget.
        hidden_dropout_prob=0.0,
        local_attention_probs_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0,
        use_reversible_backward=True,
    )


def corpus_files(stdlib: str) -> list[str]:
    names = sorted(
        name for name in os.listdir(stdlib) if name.endswith(".py") and not name.startswith(EXCLUDED_PREFIXES)
    )
    return [os.path.join(stdlib, name) for name in names]


def load_corpus(stdlib: str) -> tuple[torch.Tensor, torch.Tensor, str, dict]:
    """Training and held-out token streams (1-D int64), the SHA-256 of the corpus, and a description."""
    files = corpus_files(stdlib)
    digest = hashlib.sha256()
    streams: dict[bool, list[int]] = {True: [], False: []}
    held_out_names = []
    for index, path in enumerate(files):
        with open(path, "rb") as handle:
            data = handle.read()
        digest.update(os.path.basename(path).encode() + b"\0" + data)
        held_out = index % HELD_OUT_EVERY == HELD_OUT_EVERY // 2
        streams[held_out] += tokenizer.encode(data, add_eos=True)
        if held_out:
            held_out_names.append(os.path.basename(path))
    description = {
        "source": f"{stdlib}/*.py (CPython {platform.python_version()} standard library, PSF License)",
        "files": len(files),
        "held_out_files": held_out_names,
        "train_tokens": len(streams[False]),
        "held_out_tokens": len(streams[True]),
    }
    as_tensor = lambda ids: torch.tensor(ids, dtype=torch.long)  # noqa: E731
    return as_tensor(streams[False]), as_tensor(streams[True]), digest.hexdigest(), description


def sample_batch(stream: torch.Tensor, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """B, L windows at random offsets of the training stream."""
    starts = torch.randint(0, len(stream) - SEQUENCE_LENGTH, (batch_size,), generator=generator)
    return torch.stack([stream[start:start + SEQUENCE_LENGTH] for start in starts.tolist()])


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_bits_per_byte(model: ReformerModelWithLMHead, stream: torch.Tensor) -> float:
    """Cross-entropy in bits per predicted byte over non-overlapping windows of SEQUENCE_LENGTH tokens (the
    first token of each window is context only; EOS targets are not bytes and are not counted)."""
    model.eval()
    total_bits, total_bytes = 0.0, 0
    for window in stream.split(SEQUENCE_LENGTH):
        logits = model(input_ids=window.unsqueeze(0)).logits[0, :-1]
        targets = window[1:]
        is_byte = targets >= tokenizer.BYTE_OFFSET
        nats = torch.nn.functional.cross_entropy(logits[is_byte], targets[is_byte], reduction="sum")
        total_bits += nats.item() / math.log(2)
        total_bytes += int(is_byte.sum())
    return total_bits / total_bytes


def unigram_bits_per_byte(train: torch.Tensor, held_out: torch.Tensor) -> float:
    """Baseline: held-out cross-entropy of the training text's byte frequencies (add-one smoothed)."""
    counts = torch.bincount(train[train >= tokenizer.BYTE_OFFSET] - tokenizer.BYTE_OFFSET, minlength=256) + 1.0
    log2_probs = torch.log2(counts / counts.sum())
    targets = held_out[held_out >= tokenizer.BYTE_OFFSET] - tokenizer.BYTE_OFFSET
    return float(-log2_probs[targets].mean())


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_stream, held_out_stream, corpus_sha256, corpus = load_corpus(args.stdlib)
    print(f"corpus sha256 {corpus_sha256}: {corpus['train_tokens']} training and "
          f"{corpus['held_out_tokens']} held-out tokens from {corpus['files']} files", flush=True)
    model = ReformerModelWithLMHead(byte_lm_config())
    model.train()
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"{parameters} parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.98), weight_decay=0.01)
    recent_bits: list[float] = []
    started = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.learning_rate, args.warmup)
        batch = sample_batch(train_stream, args.batch_size, generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent_bits = (recent_bits + [loss.item() / math.log(2)])[-LOSS_REPORT_EVERY:]
        if step % LOSS_REPORT_EVERY == LOSS_REPORT_EVERY - 1 or step == args.steps - 1:
            print(f"step {step + 1:5d}  loss {sum(recent_bits) / len(recent_bits):.3f} bits/token (mean of the last "
                  f"{len(recent_bits)} steps)  {time.perf_counter() - started:6.0f} s", flush=True)
    training_seconds = time.perf_counter() - started
    bits_per_byte = held_out_bits_per_byte(model, held_out_stream)
    record = {
        "command": "python scripts/train_byte_lm.py " + " ".join(sys.argv[1:]),
        "corpus_sha256": corpus_sha256,
        "corpus": corpus,
        "parameters": parameters,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "tokens_seen": args.steps * args.batch_size * SEQUENCE_LENGTH,
        "sequence_length": SEQUENCE_LENGTH,
        "learning_rate": args.learning_rate,
        "warmup": args.warmup,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "training_seconds": round(training_seconds, 1),
        "held_out_bits_per_byte": round(bits_per_byte, 4),
        "unigram_bits_per_byte": round(unigram_bits_per_byte(train_stream, held_out_stream), 4),
        "uniform_bits_per_byte": 8.0,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    model.save_pretrained(args.output)
    write_json_atomically(record, os.path.join(args.output, TRAINING_RECORD))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="model directory to write (config.json, model.safetensors)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="windows of 1024 tokens per step")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batch sampling")
    # One thread: on a shared 2-core machine two OpenMP threads per process spin against each other (measured:
    # 0.85 s per step with one thread, 3 to 7 s with two, while four other processes ran).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="folder of the training text")
    args = parser.parse_args()
    if not os.path.isdir(args.stdlib):
        parser.error(f"--stdlib {args.stdlib} is not a folder")
    torch.set_num_threads(args.threads)
    record = train(args)
    print(json.dumps({key: record[key] for key in (
        "training_seconds", "held_out_bits_per_byte", "unigram_bits_per_byte", "uniform_bits_per_byte")}))


if __name__ == "__main__":
    main()
