"""Diagnostic, not a benchmark: train CoFi on MiniLM in this process and print where its gates end.

    .venv/bin/python bench/cofi_gates.py BUDGET STEPS WEIGHT_LR     # e.g. 0.7 600 5e-5

Short sequences (48 tokens, batches of 8) so that a run takes minutes. Prints, per layer, the block
gates' P(on), the heads' and neurons' expected counts and the neurons' log_alpha range, then the
fidelity of the deterministically gated model and of the cut model (equal unless the trim to the
budget had to cut more, as after a few steps), and the first and last distillation loss. Written to find out why cofi at the CPU default is poor (issue 6).
"""

from __future__ import annotations

import sys

import torch

from gfprune_ray.data import read_examples, tokenize
from gfprune_ray.evaluate import fidelity, sentence_embeddings
from gfprune_ray.loading import load_model
from gfprune_ray.methods.cofi import _block_key, _unit_key
from gfprune_ray.methods.trained import kept_fraction, student_for
from gfprune_ray.models import adapter_for
from gfprune_ray.training import GatedTraining, Schedule, run_training

SEQ_LEN = 40.0  # tokens per sequence for the MACs model (the 48-token batches average about 40)


def main() -> None:
    budget, steps, lr = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    torch.set_num_threads(2)
    model, tokenizer = load_model("pkg:all-minilm-l6-v2")
    texts = read_examples("pydoc").texts
    batches = tokenize(tokenizer, texts[:128], 48, 8)
    evaluation = tokenize(tokenizer, texts[500:564], 48, 16)
    reference = sentence_embeddings(model, evaluation)
    adapter = adapter_for(model)
    geoms = adapter.geometries()
    student = student_for("cofi", adapter, SEQ_LEN)
    training = run_training(GatedTraining(student, Schedule(steps=steps, budget=budget, lr=lr)), batches)
    student.eval()
    with torch.no_grad():
        student._current = student.site_gates()
        gated = fidelity(reference, sentence_embeddings(model, evaluation))
        student._current = {}
    for i in range(adapter.num_layers):
        p = {k: student.gates[_block_key((i, k))].keep_probability().item() for k in ("attn", "ffn")}
        heads = student.gates[_unit_key((i, "attn"))].keep_probability().sum().item()
        neurons = student.gates[_unit_key((i, "ffn"))]
        kept_neurons, la = neurons.keep_probability().sum().item(), neurons.log_alpha
        print(f"layer {i}: P(attention block) {p['attn']:.2f}, heads {heads:.1f}/{geoms[i].units}, P(FFN block) {p['ffn']:.2f}, "
              f"neurons {kept_neurons:.0f}/{geoms[i].ffn}, neuron log_alpha {la.min().item():.1f}..{la.max().item():.1f}")
    student.finish(budget)
    cut = fidelity(reference, sentence_embeddings(model, evaluation))
    kept = kept_fraction(adapter, geoms, SEQ_LEN)
    first, last = training.curve[0]["task_loss"], training.curve[-1]["task_loss"]
    print(f"budget {budget} steps {steps}: kept {kept:.3f}, fidelity gated {gated:.4f}, cut {cut:.4f}, distillation loss {first:.3f} -> {last:.3f}")


if __name__ == "__main__":
    main()
