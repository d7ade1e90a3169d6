"""Train a small GPT-2 on this machine, so that the benchmarks have a real decoder.

No decoder's weights ship in a package on the registry this project can reach (the hub is
offline here), and a random decoder's perplexity says nothing about pruning. This script trains
one from scratch on English text that is already on every machine: the docstrings of the Python
standard library, read with `ast` (nothing is imported). Paragraphs that also occur in the pydoc
corpus, which the benchmarks calibrate and evaluate on, are dropped, so evaluation text is unseen.

    .venv/bin/python bench/train_decoder.py                 # -> bench/models/docstring-gpt2
    .venv/bin/python bench/core.py --model bench/models/docstring-gpt2 ...

Deterministic for a given Python (its stdlib is the corpus) and torch; about 10 minutes on 2 CPU
cores. A small model on little text: it is a stand-in for the paper's decoders, not one of them.
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
import transformers as T

from gfprune_ray.data import read_examples

OUT = Path(__file__).parent / "models" / "docstring-gpt2"
EOS = "<|endoftext|>"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def docstring_paragraphs(exclude: set[str]) -> list[str]:
    """Paragraphs of every docstring in the standard library (tests and IDLE left out), in a fixed
    order, without those in `exclude`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not {"test", "tests", "idlelib", "site-packages"} & set(p.parts))
    out = []
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for para in (ast.get_docstring(node) or "").split("\n\n"):
                    para = " ".join(para.split())
                    if len(para) >= 40 and para not in exclude:
                        out.append(para)
    return out


def train_tokenizer(texts: list[str], vocab: int) -> T.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False))
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    ids = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
    return torch.tensor(ids, dtype=torch.long)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    pydoc = {" ".join(t.split()) for t in read_examples("pydoc").texts}
    texts = docstring_paragraphs(pydoc)
    tokenizer = train_tokenizer(texts, args.vocab)
    stream = token_stream(tokenizer, texts)
    print(f"{len(texts)} paragraphs, {len(stream)} tokens, vocab {len(tokenizer)}", file=sys.stderr)
    config = T.GPT2Config(vocab_size=len(tokenizer), n_positions=args.seq_len, n_embd=192, n_layer=4, n_head=6, n_inner=768,
                          bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    model = T.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / args.steps))))
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        offsets = torch.randint(0, len(stream) - args.seq_len - 1, (args.batch,), generator=g)
        batch = torch.stack([stream[o : o + args.seq_len] for o in offsets])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
