"""Peer baselines for the cross-domain benchmark: two published pruning tools, run on the same
models and text as gfprune-ray, at the same kept prunable MACs.

    # what `make bench` installs first (textpruner with --no-deps: its setup.py compares version strings and asks numpy<1.22 on Python 3.10+)
    .venv/bin/pip install -c constraints.txt torch-pruning==1.6.1 sentencepiece && .venv/bin/pip install --no-deps textpruner==1.1.post2
    OMP_NUM_THREADS=1 .venv/bin/python bench/peers.py                          # MiniLM and MPNet, budgets 0.8,0.6
    OMP_NUM_THREADS=1 .venv/bin/python bench/peers.py --models pkg:all-minilm-l6-v2 --budgets 0.6 \\
        --samples 32 --eval-samples 16 --out bench/results/peers_quick.json       # a quick check

Peers (benchmark-only dependencies: `make bench` installs them, gfprune-ray never imports them):

- **torch-pruning** (Fang et al., DepGraph): group L2-magnitude pruning as its Hugging Face BERT
  example sets it up: `MetaPruner` with `MagnitudeImportance(p=2, group_reduction="mean")`,
  `global_pruning=True`, `num_heads` for the query, key and value layers, `prune_num_heads=True`,
  `prune_head_dims=False`, `head_pruning_ratio` = `pruning_ratio` = r. Unlike the example, every
  layer that writes the residual stream (attention output and FFN output projections) is ignored
  besides the pooler, so that only heads and FFN neurons go (the example also narrows the hidden
  size, which our budget does not cover and which would change the embeddings' width). One ratio r
  is searched (bisection) so that the kept prunable MACs meet the budget. MPNet: its relative
  position bias is shared by every layer, which the dependency graph would read as one coupled
  group (nothing prunable); the bias is detached while the graph is traced, and after pruning
  each layer reads the bias columns of the heads it kept (our glue, a forward pre-hook).
- **textpruner** (Yang et al., ACL 2022 demo): `TransformerPruner` in its self-supervised mode
  (`use_logits=True`, `pruning_method="iterative"`, global allocation `head_even_masking=False,
  ffn_even_masking=False`, as its self-supervised XNLI example; `n_iters` is `--textpruner-iters`,
  default 1, where that example uses 8: each iteration is a forward and backward pass over the
  calibration data plus a forward of the fp16 copy, minutes per MPNet prune on one thread): importance |w * dL/dw| summed over
  the calibration batches, L the cross-entropy between the model's outputs and those of a frozen
  fp16 copy (KL up to a constant). A bare sentence encoder has no logits: the adaptor hands it the
  last hidden states, so the "predictions" are the per-token softmax over hidden dimensions. Targets:
  heads per layer round(budget x heads), FFN size per layer the largest that keeps the MACs within
  the budget. Its own cut (`keep_shape=False`) calls `PreTrainedModel.prune_heads`, which
  transformers 5 removed, so it runs with `keep_shape=True` (masked weights) and our glue slices the
  masked units out (`Adapter.prune_block`); the script checks that the sliced model reproduces the
  masked one. TextPruner has no MPNet structure; the glue registers one (module names only).

Both peers only select units (no weight update), so a peer's pruned model is the dense model with
heads and neurons removed. Kept MACs are `gfprune_ray.flops` on the pruned model at the calibration's
mean sequence length. Quality: fidelity (`gfprune_ray.evaluate.QualityReference`) on the pydoc
held-back examples and on `--eval-data` corpora (each corpus's own seeded evaluation split).
Writes JSON and a Markdown table (same stem, .md). Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from gfprune_ray.data import mean_tokens_per_sequence, read_examples, split_examples, tokenize
from gfprune_ray.errors import UserError
from gfprune_ray.evaluate import QualityReference
from gfprune_ray.flops import kept_prunable_macs, prunable_macs, unit_macs
from gfprune_ray.loading import load_model
from gfprune_ray.models import adapter_for
from gfprune_ray.options import PruneOptions
from gfprune_ray.single import prepare_batches

RESULTS = Path(__file__).parent / "results"
PEERS = ("torch-pruning", "textpruner")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="pkg:all-minilm-l6-v2,pkg:all-mpnet-base-v2")
    p.add_argument("--budgets", default="0.8,0.6", help="fractions of prunable MACs kept")
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--data", default="pydoc", help="calibration corpus (its held-back examples are evaluated too)")
    p.add_argument("--eval-data", default="austen,licenses", help="other evaluation corpora")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--textpruner-iters", type=int, default=1,
                   help="TextPruner n_iters (its XNLI example uses 8: each is a forward and backward pass over the calibration data)")
    p.add_argument("--search-steps", type=int, default=14, help="bisection steps on torch-pruning's ratio")
    p.add_argument("--tolerance", type=float, default=0.01, help="kept MACs may exceed the budget by at most this")
    p.add_argument("--out", type=Path, default=RESULTS / "peers.json")
    return p.parse_args()


# ---- shared glue ---------------------------------------------------------------------------------

def attention_parts(layer: nn.Module, model_type: str) -> tuple[nn.Module, list[nn.Linear], nn.Linear]:
    """(self-attention module, [query, key, value], output projection) of one encoder layer."""
    if model_type == "mpnet":
        attn = layer.attention.attn
        return attn, [attn.q, attn.k, attn.v], attn.o
    attn = layer.attention.self
    return attn, [attn.query, attn.key, attn.value], layer.attention.output.dense


def matching_rows(pruned: torch.Tensor, dense: torch.Tensor, block: int) -> list[int]:
    """Indices of the `block`-row blocks of `dense` that `pruned` kept, in order (rows are copied
    unchanged by both peers, so matching is exact)."""
    index = {dense[i * block:(i + 1) * block].numpy().tobytes(): i for i in range(dense.shape[0] // block)}
    return [index[pruned[j * block:(j + 1) * block].numpy().tobytes()] for j in range(pruned.shape[0] // block)]


@torch.no_grad()
def kept_units(pruned: nn.Module, dense: nn.Module) -> tuple[list[list[int]], list[list[int]]]:
    """Per layer, the dense indices of the kept heads and FFN neurons of a peer-pruned model whose
    kept weights are the dense ones (read from the query and FFN input weights)."""
    model_type, head_dim = dense.config.model_type, adapter_for(dense).head_dim
    heads, neurons = [], []
    for lp, ld in zip(pruned.encoder.layer, dense.encoder.layer):
        q_p = attention_parts(lp, model_type)[1][0].weight
        q_d = attention_parts(ld, model_type)[1][0].weight
        heads.append(matching_rows(q_p.detach(), q_d.detach(), head_dim))
        neurons.append(matching_rows(lp.intermediate.dense.weight.detach(), ld.intermediate.dense.weight.detach(), 1))
    return heads, neurons


def _bias_of_kept_heads(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a pruned MPNetSelfAttention: the shared relative position bias
    (batch, heads, q, k), narrowed to the heads this layer kept."""
    heads = module.peer_kept_heads
    if len(args) >= 3 and args[2] is not None:
        args = (*args[:2], args[2].index_select(1, heads), *args[3:])
    elif kwargs.get("position_bias") is not None:
        kwargs = dict(kwargs, position_bias=kwargs["position_bias"].index_select(1, heads))
    return args, kwargs


def _detach_position_bias(module: nn.Module, args: tuple, kwargs: dict):
    if len(args) >= 3 and args[2] is not None:
        args = (*args[:2], args[2].detach(), *args[3:])
    elif kwargs.get("position_bias") is not None:
        kwargs = dict(kwargs, position_bias=kwargs["position_bias"].detach())
    return args, kwargs


def set_head_counts(model: nn.Module, heads: list[list[int]]) -> None:
    """Make each self-attention agree with its (already sliced) projections; MPNet layers that lost
    heads read only their heads' columns of the shared position bias."""
    model_type = model.config.model_type
    for layer, kept in zip(model.encoder.layer, heads):
        attn, (q, _, _), _ = attention_parts(layer, model_type)
        attn.num_attention_heads = len(kept)
        attn.all_head_size = q.out_features
        if model_type == "mpnet" and len(kept) < model.config.num_attention_heads:
            attn.register_buffer("peer_kept_heads", torch.tensor(kept, dtype=torch.long), persistent=False)
            attn.register_forward_pre_hook(_bias_of_kept_heads, with_kwargs=True)


def sliced_dense(dense: nn.Module, heads: list[list[int]], neurons: list[list[int]]) -> nn.Module:
    """The dense model with only the given heads and neurons, cut by gfprune-ray's surgery (handles
    a layer that keeps no head, which transformers' attention cannot run as a zero-width layer)."""
    model = copy.deepcopy(dense)
    adapter = adapter_for(model)
    for i, (h, n) in enumerate(zip(heads, neurons)):
        adapter.prune_block(i, torch.tensor(h, dtype=torch.long), torch.tensor(n, dtype=torch.long))
    return model


@torch.inference_mode()
def max_output_diff(a: nn.Module, b: nn.Module, batch: dict) -> float:
    ha = a(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    hb = b(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return float((ha - hb).abs().max())


def kept_fraction(model: nn.Module, dense_total: float, seq_len: float) -> float:
    return kept_prunable_macs(adapter_for(model), seq_len) / dense_total


# ---- Torch-Pruning -------------------------------------------------------------------------------

def torch_pruning_once(dense: nn.Module, example: dict, ratio: float) -> tuple[nn.Module, float]:
    """A fresh copy of `dense` pruned by Torch-Pruning at head and channel ratio `ratio`; (model, s)."""
    import torch_pruning as tp

    model = copy.deepcopy(dense)
    for param in model.parameters():
        param.requires_grad_(True)  # the dependency graph is traced through autograd
    start = time.perf_counter()
    model_type = model.config.model_type
    num_heads, ignored, tracing_hooks = {}, [], []
    for layer in model.encoder.layer:
        attn, qkv, out = attention_parts(layer, model_type)
        for linear in qkv:
            num_heads[linear] = attn.num_attention_heads
        ignored += [out, layer.output.dense]  # the residual stream keeps its width
        if model_type == "mpnet":
            tracing_hooks.append(attn.register_forward_pre_hook(_detach_position_bias, with_kwargs=True))
    if getattr(model, "pooler", None) is not None:
        ignored.append(model.pooler)
    if model_type == "mpnet":
        ignored.append(model.encoder.relative_attention_bias)
    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(
            model, example,
            importance=tp.importance.MagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=True,
            pruning_ratio=ratio,
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=ratio,
            output_transform=lambda out: out.last_hidden_state.sum(),
            ignored_layers=ignored,
        )
    for hook in tracing_hooks:
        hook.remove()
    pruner.step()
    seconds = time.perf_counter() - start
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval(), seconds


def run_torch_pruning(ctx: dict, budget: float, args) -> dict:
    """Bisect Torch-Pruning's ratio r for kept MACs closest to `budget` (at most budget + tolerance)."""
    dense, total, seq_len = ctx["dense"], ctx["dense_macs"], ctx["seq_len"]
    example = {k: v[:2] for k, v in ctx["calib_batches"][0].items()}
    start = time.perf_counter()
    trials: dict[float, float] = {}
    lo, hi = 0.0, 0.99  # kept MACs fall as r grows
    for _ in range(args.search_steps):
        r = round((lo + hi) / 2, 6)
        model, _ = torch_pruning_once(dense, example, r)
        trials[r] = kept_fraction(model, total, seq_len)
        if trials[r] > budget:
            lo = r
        else:
            hi = r
    feasible = {r: k for r, k in trials.items() if k <= budget + args.tolerance}
    ratio = min(feasible, key=lambda r: (abs(feasible[r] - budget), r)) if feasible else hi
    search_s = time.perf_counter() - start
    model, prune_s = torch_pruning_once(dense, example, ratio)  # the timed prune, at the chosen ratio
    heads, neurons = kept_units(model, dense)
    rebuilt = sliced_dense(dense, heads, neurons)
    if any(len(h) == 0 for h in heads):
        # transformers cannot run a zero-head attention (view(..., -1, head_dim) of nothing): evaluate
        # the same selection cut by our surgery, which turns that attention into its output bias
        evaluated, diff = rebuilt, None
    else:
        set_head_counts(model, heads)
        evaluated, diff = model, max_output_diff(model, rebuilt, ctx["calib_batches"][0])
    config = {"importance": "MagnitudeImportance(p=2, group_reduction=mean)", "global_pruning": True, "pruning_ratio": ratio,
              "head_pruning_ratio": ratio, "prune_num_heads": True, "prune_head_dims": False,
              "ignored": "pooler, attention output and FFN output projections (residual stream)"}
    return dict(model_out=evaluated, heads=heads, neurons=neurons, prune_s=prune_s, search_s=search_s, config=config,
                search={str(r): k for r, k in sorted(trials.items())}, evaluated_model="torch-pruning's own" if diff is not None else "rebuilt",
                max_diff_vs_selection=diff)


# ---- TextPruner ----------------------------------------------------------------------------------

def register_mpnet_structure() -> None:
    """TextPruner's MODEL_MAP has no MPNet; describe its module names (glue, no behaviour)."""
    from textpruner.model_map import MODEL_MAP
    from textpruner.model_utils.model_structure import ModelStructure

    if "mpnet" in MODEL_MAP:
        return

    class MPNetStructure(ModelStructure):
        MODEL_PREFIX = "mpnet."
        ENCODER_PREFIX = r"encoder.layer.[0-9]+\."
        LAYER_PATTERNS = dict(query=r"attention.attn.q$", key=r"attention.attn.k$", value=r"attention.attn.v$",
                              att_dense=r"attention.attn.o$", interm_dense=r"intermediate.dense$", output_dense=r"output.dense$")
        ATTENTION_PREFIX = ("attention.attn",)
        ATTENTION_LAYERS = ("query", "key", "value")
        MHA_LAYERS = ATTENTION_LAYERS + ("att_dense",)
        NAME_CONFIG = dict(hidden_size="hidden_size", intermediate_size="intermediate_size", num_hidden_layers="num_hidden_layers",
                           num_attention_heads="num_attention_heads", attention_head_size="attention_head_size")

    MODEL_MAP["mpnet"] = {"structure": MPNetStructure}


def textpruner_targets(ctx: dict, budget: float, tolerance: float) -> tuple[int, int]:
    """(heads per layer, FFN neurons per layer) on average: heads round(budget x heads), the FFN as
    large as the MACs allow. Every dense layer has the same shape, so MACs depend only on totals."""
    geom = ctx["geometries"][0]
    layers, seq_len, total = len(ctx["geometries"]), ctx["seq_len"], ctx["dense_macs"]
    head, neuron = unit_macs(geom, "attn", seq_len), unit_macs(geom, "ffn", seq_len)
    heads = max(1, round(budget * geom.units))
    room = budget * total - layers * heads * head
    below = int(room // (layers * neuron))
    candidates = [f for f in (below, below + 1) if 0 <= f <= geom.ffn and (layers * (heads * head + f * neuron)) / total <= budget + tolerance]
    ffn = min(candidates, key=lambda f: abs(layers * (heads * head + f * neuron) / total - budget))
    return heads, ffn


def run_textpruner(ctx: dict, budget: float, args) -> dict:
    """TextPruner at heads round(budget x heads) per layer and the FFN size that lands closest to the
    budget. TextPruner gives a head back to a layer it would leave empty, which can overshoot; then
    the FFN target is lowered and the masks redrawn from the importance scores it cached (its own
    `rewrite_cache=False`), so only the first run pays for scoring."""
    from textpruner import GeneralConfig, TransformerPruner, TransformerPruningConfig

    register_mpnet_structure()
    dense, geom, total = ctx["dense"], ctx["geometries"][0], ctx["dense_macs"]
    neuron_step = len(ctx["geometries"]) * unit_macs(geom, "ffn", ctx["seq_len"]) / total  # one FFN neuron per layer
    heads_target, ffn_target = textpruner_targets(ctx, budget, args.tolerance)
    search_s, tried = 0.0, {}
    with tempfile.TemporaryDirectory() as tmp:
        for attempt in range(5):
            model = copy.deepcopy(dense)
            for param in model.parameters():
                param.requires_grad_(True)
            config = TransformerPruningConfig(target_ffn_size=ffn_target, target_num_of_heads=heads_target, pruning_method="iterative",
                                              n_iters=args.textpruner_iters, use_logits=True, head_even_masking=False, ffn_even_masking=False)
            start = time.perf_counter()
            with torch.enable_grad():
                pruner = TransformerPruner(model, transformer_pruning_config=config, general_config=GeneralConfig(use_device="cpu", output_dir=tmp))
                pruner.prune(dataloader=ctx["calib_batches"], adaptor=lambda out: out.last_hidden_state, keep_shape=True,
                             save_model=False, rewrite_cache=attempt == 0)
            model.eval()
            for param in model.parameters():
                param.requires_grad_(False)
            heads = [torch.nonzero(row).flatten().tolist() for row in pruner.head_mask]
            neurons = [torch.nonzero(row).flatten().tolist() for row in pruner.ffn_mask]
            masked_reference = copy.deepcopy(model)
            adapter = adapter_for(model)  # cut what TextPruner masked (its own cut needs prune_heads, gone in transformers 5)
            for i, (h, n) in enumerate(zip(heads, neurons)):
                adapter.prune_block(i, torch.tensor(h, dtype=torch.long), torch.tensor(n, dtype=torch.long))
            seconds = time.perf_counter() - start
            if attempt == 0:
                prune_s = seconds
            else:
                search_s += seconds
            kept = kept_fraction(model, total, ctx["seq_len"])
            tried[ffn_target] = kept
            overshoot = kept - budget
            if overshoot <= neuron_step / 2 or ffn_target == 0:
                break
            ffn_target = max(0, ffn_target - max(1, round(overshoot / neuron_step)))
    diff = max_output_diff(masked_reference, model, ctx["calib_batches"][0])
    config = {"use_logits": True, "pruning_method": "iterative", "n_iters": args.textpruner_iters, "target_num_of_heads": heads_target,
              "target_ffn_size": ffn_target, "head_even_masking": False, "ffn_even_masking": False,
              "adaptor": "last_hidden_state as logits", "keep_shape": True}
    return dict(model_out=model, heads=heads, neurons=neurons, prune_s=prune_s, search_s=search_s, config=config,
                search={str(f): k for f, k in tried.items()}, evaluated_model="masked units sliced out", max_diff_vs_selection=diff)


RUNNERS = {"torch-pruning": run_torch_pruning, "textpruner": run_textpruner}


# ---- benchmark -----------------------------------------------------------------------------------

def prepare(source: str, args) -> dict:
    dense, tokenizer = load_model(source)
    for param in dense.parameters():
        param.requires_grad_(False)
    adapter = adapter_for(dense)
    opts = PruneOptions(samples=args.samples, eval_samples=args.eval_samples, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed).validate()
    calib_batches, eval_batches, labels = prepare_batches(tokenizer, read_examples(args.data), opts)
    seq_len = mean_tokens_per_sequence(calib_batches)
    corpora = {args.data: eval_batches}
    missing = {}
    for name in filter(None, (c.strip() for c in args.eval_data.split(","))):
        if name == args.data:
            continue
        try:
            evaluation = split_examples(read_examples(name), opts.samples, opts.eval_samples, opts.seed)[1]
        except UserError as exc:
            missing[name] = str(exc)
            print(f"   skipping corpus {name}: {exc}", file=sys.stderr)
            continue
        corpora[name] = tokenize(tokenizer, evaluation.texts, opts.seq_len, opts.batch_size)
    references = {name: QualityReference(dense, adapter, batches, task="embedding") for name, batches in corpora.items()}
    geometries = adapter.geometries()
    return dict(dense=dense, calib_batches=calib_batches, seq_len=seq_len, geometries=geometries,
                dense_macs=prunable_macs(geometries, seq_len), references=references, missing=missing,
                calibration_tokens=sum(int(b["attention_mask"].sum()) for b in calib_batches))


def bench_model(source: str, args) -> dict:
    print(f"== {source}", file=sys.stderr)
    ctx = prepare(source, args)
    runs = []
    for budget in (float(b) for b in args.budgets.split(",")):
        for peer in filter(None, args.peers.split(",")):
            start = time.perf_counter()
            result = RUNNERS[peer](ctx, budget, args)
            model = result.pop("model_out")
            row = dict(peer=peer, budget=budget, kept_prunable_macs=kept_fraction(model, ctx["dense_macs"], ctx["seq_len"]),
                       heads=sum(map(len, result["heads"])), neurons=sum(map(len, result["neurons"])),
                       heads_per_layer=[len(h) for h in result["heads"]], neurons_per_layer=[len(n) for n in result["neurons"]])
            row |= {f"fidelity/{name}": ref.measure(model)["fidelity"] for name, ref in ctx["references"].items()}
            row |= {k: v for k, v in result.items() if k not in ("heads", "neurons")}
            row["total_s"] = time.perf_counter() - start
            runs.append(row)
            fids = " ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in row.items() if k.startswith("fidelity/"))
            print(f"   {peer:13s} b={budget:.2f} kept={row['kept_prunable_macs']:.4f} {fids} prune {row['prune_s']:.1f} s", file=sys.stderr)
            del model
    return dict(model=source, mean_seq_len=ctx["seq_len"], calibration_tokens=ctx["calibration_tokens"], dense_prunable_macs=ctx["dense_macs"],
                corpora=list(ctx["references"]), missing_corpora=ctx["missing"], runs=runs)


def versions() -> dict:
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
    for name, module in (("torch-pruning", "torch_pruning"), ("textpruner", "textpruner")):
        try:
            out[name] = __import__(module).__version__
        except ImportError:
            out[name] = None
    return out


def markdown(result: dict) -> str:
    args = result["args"]
    lines = [f"Generated by `python bench/peers.py` ({torch.get_num_threads()} torch threads, {platform.machine()}), "
             f"{result['wall_s']:.0f} s in all. Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".",
             "",
             f"Calibration: {args['samples']} `{args['data']}` examples as `gfprune-ray prune` picks them (seed {args['seed']}, "
             f"sequences up to {args['seq_len']}); fidelity (mean cosine similarity of mean-pooled sentence embeddings to the dense model's) "
             f"on {args['eval_samples']} held-back examples of each corpus. Kept MACs: prunable (heads and FFN neurons) MACs kept, "
             "gfprune_ray.flops at the calibration's mean sequence length. Prune s: the peer's pruning at the chosen setting "
             "(torch-pruning: one prune at the searched ratio; textpruner: its scoring passes and masking, plus our cut of the "
             "masked units). Search s: torch-pruning's bisection on its ratio (one prune per step); textpruner's redraws of the masks at a "
             "smaller FFN target from its cached scores, where the head it gives back to a layer it would empty overshot the budget.",
             ""]
    corpora = list(dict.fromkeys(c for m in result["models"] for c in m["corpora"]))
    head = ["model", "peer", "budget", "kept MACs", "heads", "neurons"] + [f"{c} (calib)" if c == args["data"] else c for c in corpora] + ["prune s", "search s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in result["models"]:
        for r in m["runs"]:
            cells = [m["model"], r["peer"], f"{r['budget']:.2f}", f"{r['kept_prunable_macs']:.4f}", str(r["heads"]), str(r["neurons"])]
            cells += [f"{r[f'fidelity/{c}']:.4f}" if f"fidelity/{c}" in r else "n/a" for c in corpora]
            cells += [f"{r['prune_s']:.1f}", f"{r['search_s']:.1f}" if "search_s" in r else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    missing = {c: why for m in result["models"] for c, why in m["missing_corpora"].items()}
    if missing:
        lines += ["", "Corpora not measured: " + "; ".join(f"{c} ({why})" for c, why in missing.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    unknown = [p for p in args.peers.split(",") if p and p not in RUNNERS]
    if unknown:
        sys.exit(f"unknown peer(s) {unknown}; choose from {list(RUNNERS)}")
    start = time.perf_counter()
    models = [bench_model(source.strip(), args) for source in args.models.split(",") if source.strip()]
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "versions": versions(),
              "torch_threads": torch.get_num_threads(), "wall_s": time.perf_counter() - start, "models": models}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
