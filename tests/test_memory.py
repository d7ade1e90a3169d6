"""Memory bounds that matter for large models (issue 15): a pruned model loads without ever
holding its full-size original. Measured from the OS (peak resident set of a fresh process)."""

from __future__ import annotations

import subprocess
import sys

import torch
import transformers as T

from gfprune_ray import load_pruned
from gfprune_ray.models import adapter_for
from gfprune_ray.surgery import save_pruned

# VmHWM: the peak resident set of this process's own memory (getrusage's ru_maxrss carries the
# parent's peak across fork and exec, so a child of a big test process would report the parent's)
PEAK = "int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024"


def _peak_growth(load: str, folder) -> int:
    """How much `load` raises the peak resident bytes of a fresh Python process that has already
    imported torch, transformers and Llama's modeling code (several hundred MB of their own)."""
    setup = "c = transformers.AutoConfig.from_pretrained(sys.argv[1]); transformers.LlamaForCausalLM"  # imports Llama's code (130 MB)
    code = f"import sys, torch, transformers, gfprune_ray; {setup}; before = {PEAK}; {load}; print({PEAK} - before)"
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_load_pruned_never_holds_the_full_size_model(tmp_path):
    # a Llama whose FFNs are most of its 700 MB; pruned to one head and 64 neurons per layer
    config = T.LlamaConfig(hidden_size=1024, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8, intermediate_size=8192,
                           vocab_size=256, max_position_embeddings=64, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config).eval()
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    adapter = adapter_for(model)
    for i in range(adapter.num_layers):
        adapter.prune_block(i, torch.tensor([i % 8]), torch.arange(64) * 7)
    pruned_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    save_pruned(model, tmp_path / "pruned")
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))

    loaded = load_pruned(tmp_path / "pruned")
    assert not [n for n, p in loaded.named_parameters() if p.device.type == "meta"]
    with torch.inference_mode():  # the rotary frequencies (a computed, unsaved buffer) came out right
        assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)

    pruned_growth = _peak_growth("gfprune_ray.load_pruned(sys.argv[1])", tmp_path / "pruned")
    dense_growth = _peak_growth("transformers.LlamaForCausalLM(c)", tmp_path / "pruned")
    assert pruned_bytes < dense_bytes / 20
    # building the full-size model costs its weights' memory (the old load_pruned did); loading the pruned one does not
    assert dense_growth > 0.8 * dense_bytes, (dense_growth, dense_bytes)
    assert pruned_growth < 3 * pruned_bytes < 0.1 * dense_bytes, (pruned_growth, pruned_bytes, dense_bytes)
