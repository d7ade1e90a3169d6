"""Transfer benchmark (issue 13): does a pruned model keep its quality on text it was not calibrated on?

    .venv/bin/python bench/transfer.py            # the README table: all-MiniLM-L6-v2, all-mpnet-base-v2 and SmolLM2-135M,
                                                  # each calibrated on pydoc and on austen, measured on pydoc, austen and
                                                  # licenses -> bench/results/transfer.{json,md,png}
    .venv/bin/python bench/transfer.py --quick    # smoke run, a few minutes: MiniLM, tiny sizes, gfp and magnitude, one
                                                  # budget -> bench/results/transfer_quick.{json,md,png}
    .venv/bin/python bench/transfer.py --models pkg:smollm2-135m --out bench/results/transfer_smollm2.json   # one model apart

Per model and calibration corpus (--calib) the calibration examples are chosen exactly as
`gfprune-ray prune --data CORPUS` chooses them, and the evaluation corpora (--eval) exactly as
`--eval-data` builds them: the calibration corpus's held-back examples, and from every other corpus
the --eval-samples examples its own seeded split evaluates (the same examples whichever corpus
calibrated, so columns compare across tables). Statistics (inputs and output curvature) are
collected once per model and calibration corpus and shared by every row, and each method's scores
once per model and calibration corpus; a row's plan time is its scores (counted in every row that
shares them), search and reconstruction, without the statistics (`calibrate_s`, per table).
llm-surgeon collects its own curvature in every shot, so its plan time is all its shots.

Rows: every --methods x budget x --reconstructions with global allocation; magnitude with uniform
allocation, reconstructions none and full (the reference the issue asks gfp to beat); llm-surgeon
per --surgeon-shots. Budgets are --encoder-budgets for models judged by fidelity and
--decoder-budgets for causal LMs (judged by perplexity; QualityReference decides). Each plan is
measured on the dense model with the pruned units masked and the reconstructed weights swapped in
(`surgery.masked`), which gives the numbers of the cut model (the tests pin it to 1e-5; the first
plan of every model and corpus is also cut for real here and the largest difference recorded as
`masked_vs_cut_max_abs_diff`). No latency: these rows are about quality (bench/core.py measures speed).

Prints Markdown tables and targets, writes JSON (after every model, so a long run keeps what it
finished), the same Markdown next to it (.md) and a plot (.png). Not a test: nothing here asserts;
targets are reported as met or not.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers

from gfprune_ray.data import mean_tokens_per_sequence, read_examples
from gfprune_ray.loading import load_model
from gfprune_ray.methods.surgeon import step_for_shots
from gfprune_ray.models import adapter_for
from gfprune_ray.options import PruneOptions
from gfprune_ray.pipeline import calibrate, plan, plan_llm_surgeon, score_sites
from gfprune_ray.single import check_seq_len, prepare_batches, read_other_corpora, references, with_self_texts
from gfprune_ray.surgery import apply_pruning, masked

RESULTS = Path(__file__).parent / "results"

DEFAULTS = dict(
    models="pkg:all-minilm-l6-v2,pkg:all-mpnet-base-v2,pkg:smollm2-135m",
    calib="pydoc,austen",
    eval="pydoc,austen,licenses",
    methods="gfp,fluctuation,magnitude,random",
    reconstructions="full,none",
    surgeon_shots="2",
    encoder_budgets="0.8,0.6",
    decoder_budgets="0.9,0.8",
    samples=256,
    decoder_samples=128,
    eval_samples=64,
    seq_len=128,
    batch_size=16,
    seed=0,
    out=RESULTS / "transfer.json",
)
# --quick: what it changes; every option given on the command line still wins
QUICK = dict(
    models="pkg:all-minilm-l6-v2",
    methods="gfp,magnitude",
    surgeon_shots="1",
    encoder_budgets="0.6",
    decoder_budgets="0.8",
    samples=16,
    decoder_samples=16,
    eval_samples=8,
    seq_len=32,
    batch_size=8,
    out=RESULTS / "transfer_quick.json",
)
ACTIVATION_AWARE = ("gfp", "fluctuation", "llm-surgeon")
DATA_FREE = ("magnitude", "random")
DEFAULT_ROW = ("gfp", "full", "global")
# issue 13's thresholds, by budget
DECODER_BEST_RATIO = {0.9: 1.10, 0.8: 1.25}
DECODER_GFP_RATIO = {0.9: 1.2, 0.8: 1.5}
ENCODER_GFP_FIDELITY = {0.8: 0.93, 0.6: 0.85}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    p.add_argument("--models", help=f"comma-separated models (default {d['models']})")
    p.add_argument("--calib", help=f"calibration corpora, one table each (default {d['calib']})")
    p.add_argument("--eval", help=f"evaluation corpora; the calibration corpus is always measured (default {d['eval']})")
    p.add_argument("--methods", help=f"score methods, global allocation (default {d['methods']})")
    p.add_argument("--reconstructions", help=f"reconstructions of the global rows (default {d['reconstructions']})")
    p.add_argument("--surgeon-shots", help=f"llm-surgeon runs, one per shot count; empty: none (default {d['surgeon_shots']})")
    p.add_argument("--encoder-budgets", help=f"budgets of models judged by fidelity (default {d['encoder_budgets']})")
    p.add_argument("--decoder-budgets", help=f"budgets of causal LMs, judged by perplexity (default {d['decoder_budgets']})")
    p.add_argument("--samples", type=int, help=f"calibration examples (default {d['samples']})")
    p.add_argument("--decoder-samples", type=int, help=f"calibration examples of causal LMs (default {d['decoder_samples']})")
    p.add_argument("--eval-samples", type=int, help=f"evaluation examples per corpus (default {d['eval_samples']})")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence at most (default {d['seq_len']})")
    p.add_argument("--batch-size", type=int, help=f"(default {d['batch_size']})")
    p.add_argument("--seed", type=int, help=f"(default {d['seed']})")
    p.add_argument("--self-texts", type=int, help="texts a causal LM writes for its calibration (default: as prune, a quarter of the samples)")
    p.add_argument("--out", type=Path, help=f"JSON output; .md and .png beside it (default {d['out']})")
    p.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(f"{k.replace('_', '-')}={v}" for k, v in QUICK.items()))
    args = p.parse_args(argv)
    for key, value in (DEFAULTS | (QUICK if args.quick else {})).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def floats(text: str) -> list[float]:
    return [float(x) for x in split(text)]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - start


def same(a: float, b: float) -> bool:
    return abs(a - b) < 1e-9


# ---- running ------------------------------------------------------------------------------------


def measure_masked(adapter, refs, result) -> tuple[dict, float]:
    """Every corpus's metrics of the plan, on the dense model masked to behave as the pruned one."""
    start = time.perf_counter()
    with masked(adapter, result.masks, result.weights):
        metrics = refs.measure(adapter.model)
    return metrics, time.perf_counter() - start


def cut_difference(adapter, refs, result, metrics: dict) -> float:
    """Largest difference between the masked measurement and that of a copy really cut."""
    pruned = adapter_for(copy.deepcopy(adapter.model))
    apply_pruning(pruned, result.masks, result.weights)
    cut = refs.measure(pruned.model)
    return max(abs(cut[k] - metrics[k]) for k in metrics if k.startswith(("relative_quality/", "perplexity/", "fidelity/")))


def make_row(method, reconstruction, allocation, budget, shots, result, plan_s, metrics, measure_s, refs) -> dict:
    summary = result.summary()
    quality = {}
    for label, ref in refs.references.items():
        q = {"relative_quality": metrics[f"relative_quality/{label}"]}
        if ref.causal:
            q["perplexity"] = metrics[f"perplexity/{label}"]
            q["perplexity_ratio"] = q["perplexity"] / ref.dense_value
        quality[label] = q
    return {
        "method": method, "reconstruction": reconstruction, "allocation": allocation, "budget": budget, "shots": shots,
        "kept_prunable_macs": result.kept_fraction, "heads_kept": summary["heads_kept"], "neurons_kept": summary["neurons_kept"],
        "quality": quality, "plan_s": plan_s, "plan_stages_s": dict(result.timings), "measure_s": measure_s,
    }


def describe(row: dict, calib: str) -> str:
    q = row["quality"][calib]
    value = f"x{q['perplexity_ratio']:.3f}" if "perplexity_ratio" in q else f"{q['relative_quality']:.4f}"
    return (f"   {row['method']:12s} {row['reconstruction']:5s} {row['allocation']:7s} b={row['budget']:.2f} kept={row['kept_prunable_macs']:.3f} "
            f"{calib}={value} plan {row['plan_s']:.1f} s measure {row['measure_s']:.1f} s")


BEFORE = "gfp-energy"  # gfp as it was before issue 13: plain output energy, no curvature, no activity prior


def before_scores(adapter, calibration) -> dict:
    """R2 x E|W_u x_u|^2: the previous default's scores, for the before/after rows."""
    from gfprune_ray.methods.common import output_energy
    from gfprune_ray.methods.gfp import representativeness

    total = calibration.total
    return {site: representativeness(adapter.unit_weights(*site)) * output_energy(adapter.unit_weights(*site), total[site], centered=False) for site in total.sites}


def bench_calibration(adapter, tokenizer, calib: str, corpus: tuple, opts: PruneOptions, args) -> dict:
    """Every row of one model calibrated on one corpus."""
    sources, others, examples = corpus
    calib_batches, eval_batches, labels = prepare_batches(tokenizer, examples, opts)
    calib_batches, written = with_self_texts(adapter, tokenizer, calib_batches, opts)  # as `prune` adds them
    refs, reference_s = timed(references, adapter, sources, eval_batches, labels, others, tokenizer, opts)
    seq_len = mean_tokens_per_sequence(calib_batches)
    calibration, calibrate_s = timed(calibrate, adapter, calib_batches, seq_len, seed=opts.seed)
    causal = refs.references[calib].causal
    budgets = floats(args.decoder_budgets if causal else args.encoder_budgets)
    print(f"  calibrated on {calib}: {calibration.total.tokens} tokens, statistics {calibrate_s:.1f} s", file=sys.stderr)

    planned = []  # (method, reconstruction, allocation, budget, shots)
    for budget in budgets:
        planned += [(m, r, "global", budget, None) for m in split(args.methods) for r in split(args.reconstructions)]
        planned += [("magnitude", r, "uniform", budget, None) for r in ("none", "full")]
        planned += [(BEFORE, "full", "global", budget, None)]
        planned += [("llm-surgeon", f"T={t}", "global", budget, t) for t in (int(x) for x in split(args.surgeon_shots))]
    rows, cut_diff, scores = [], None, {}
    for method, reconstruction, allocation, budget, shots in planned:
        if method == "llm-surgeon":
            result, plan_s = timed(plan_llm_surgeon, adapter, calib_batches, budget, seq_len, step_for_shots(budget, shots), opts.seed)
        else:
            if method not in scores:  # scores depend on neither budget, reconstruction nor allocation: computed once
                scores[method] = timed(before_scores, adapter, calibration) if method == BEFORE else \
                    timed(score_sites, adapter, calibration.total, method, opts.seed, calibration.grads)
            result, plan_s = timed(plan, adapter, calibration, budget, method, reconstruction, allocation, opts.seed, scores=scores[method][0])
            result.timings["score_s"] = scores[method][1]
            plan_s += scores[method][1]  # the row's own plan: its (shared) scores, search and reconstruction
        metrics, measure_s = measure_masked(adapter, refs, result)
        if cut_diff is None:
            cut_diff = cut_difference(adapter, refs, result, metrics)
        rows.append(make_row(method, reconstruction, allocation, budget, shots, result, plan_s, metrics, measure_s, refs))
        print(describe(rows[-1], calib), file=sys.stderr)
    return {
        "calibration_corpus": calib,
        "corpora": sources,
        "quality_metric": "perplexity" if causal else "fidelity",
        "budgets": budgets,
        "calibration_examples": sum(len(b["input_ids"]) for b in calib_batches) - written,  # the corpus's, as prune counts them
        "calibration_tokens": calibration.total.tokens,
        "self_texts": written,
        "mean_seq_len": seq_len,
        "dense": {label: ref.dense_value for label, ref in refs.references.items()},
        "reference_s": reference_s,
        "calibrate_s": calibrate_s,
        "masked_vs_cut_max_abs_diff": cut_diff,
        "rows": rows,
    }


def bench_model(source: str, corpora: dict, args) -> dict:
    print(f"== {source}", file=sys.stderr)
    (model, tokenizer), load_s = timed(load_model, source)
    adapter = adapter_for(model)
    check_seq_len(adapter, args.seq_len)
    decoder = adapter.is_lm  # as QualityReference decides perplexity
    opts = PruneOptions(samples=args.decoder_samples if decoder else args.samples, eval_samples=args.eval_samples,
                        seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, self_texts=args.self_texts).validate()
    calibrations = {calib: bench_calibration(adapter, tokenizer, calib, corpora[calib], opts, args) for calib in split(args.calib)}
    first = next(iter(calibrations.values()))
    dense = {}
    for c in calibrations.values():
        dense |= c["dense"]
    result = {"model": source, "quality_metric": first["quality_metric"], "samples": opts.samples, "load_s": load_s,
              "dense_quality": dense, "calibrations": calibrations}
    result["targets"] = targets(result)
    return result


# ---- targets ------------------------------------------------------------------------------------


def find(rows: list[dict], method: str, reconstruction: str | None, allocation: str, budget: float) -> dict | None:
    for r in rows:
        if r["method"] == method and (reconstruction is None or r["reconstruction"] == reconstruction) and r["allocation"] == allocation \
                and same(r["budget"], budget):
            return r
    return None


def name(row: dict) -> str:
    return f"{row['method']}/{row['reconstruction']}/{row['allocation']}"


def corpus_label(label: str, calib: str) -> str:
    return f"{label} (calib)" if label == calib else label


def check(calib: str, corpus: str, budget: float, met: bool, value: float, detail: str) -> dict:
    return {"calib": calib, "corpus": corpus, "budget": budget, "met": bool(met), "value": value, "detail": detail}


def target(key: str, text: str, checks: list[dict]) -> dict:
    return {"target": key, "text": text, "met": all(c["met"] for c in checks) if checks else None, "checks": checks}


def targets(result: dict) -> list[dict]:
    """Issue 13's targets on this model's rows (a: decoders, b: encoders, c: every model)."""
    decoder = result["quality_metric"] == "perplexity"
    best, gfp, aware, b_checks, c_checks = [], [], [], [], []
    for calib, c in result["calibrations"].items():
        rows = c["rows"]
        for corpus in c["corpora"]:
            def rq(row):
                return row["quality"][corpus]["relative_quality"]

            def ratio(row):
                return row["quality"][corpus].get("perplexity_ratio", float("nan"))

            where = corpus_label(corpus, calib)
            for budget in c["budgets"]:
                at = [r for r in rows if same(r["budget"], budget)]
                default = find(rows, *DEFAULT_ROW, budget)
                if decoder and budget in DECODER_BEST_RATIO and at:
                    top = max(at, key=rq)
                    limit = DECODER_BEST_RATIO[budget]
                    best.append(check(calib, corpus, budget, ratio(top) <= limit, ratio(top), f"{where}: {name(top)} x{ratio(top):.3f} (limit x{limit:.2f})"))
                if decoder and budget in DECODER_GFP_RATIO and default:
                    limit = DECODER_GFP_RATIO[budget]
                    gfp.append(check(calib, corpus, budget, ratio(default) <= limit, ratio(default), f"{where}: x{ratio(default):.3f} (limit x{limit:.2f})"))
                if decoder:
                    # each activation-aware row against magnitude and random at the same reconstruction
                    # (llm-surgeon, whose update is the full reconstruction, against their full rows)
                    pairs = []
                    for r in at:
                        if r["method"] in ACTIVATION_AWARE and r["allocation"] == "global":
                            recon = "full" if r["method"] == "llm-surgeon" else r["reconstruction"]
                            pairs += [(r, o) for o in (find(rows, m, recon, "global", budget) for m in DATA_FREE) if o]
                    if pairs:
                        worst = min(pairs, key=lambda p: rq(p[0]) - rq(p[1]))
                        mine, theirs = worst
                        aware.append(check(calib, corpus, budget, all(rq(a) > rq(o) for a, o in pairs), rq(mine) - rq(theirs),
                                           f"{where}: {len(pairs)} pairs, closest {name(mine)} x{ratio(mine):.3f} vs {name(theirs)} x{ratio(theirs):.3f}"))
                if not decoder and corpus != calib and budget in ENCODER_GFP_FIDELITY and default:
                    limit = ENCODER_GFP_FIDELITY[budget]
                    b_checks.append(check(calib, corpus, budget, rq(default) >= limit, rq(default), f"{where}: {rq(default):.4f} (at least {limit:.2f})"))
                if corpus != calib and default:
                    rivals = [r for r in (find(rows, "gfp", "none", "global", budget), find(rows, "magnitude", "none", "uniform", budget),
                                          find(rows, "magnitude", "full", "uniform", budget)) if r]
                    if rivals:
                        top = max(rivals, key=rq)
                        shown = (lambda r: f"x{ratio(r):.3f}") if decoder else (lambda r: f"{rq(r):.4f}")
                        c_checks.append(check(calib, corpus, budget, rq(default) >= rq(top), rq(default) - rq(top),
                                              f"{where}: gfp/full/global {shown(default)} vs best of {', '.join(name(r) for r in rivals)}: {name(top)} {shown(top)}"))
    out = []
    if decoder:
        out += [target("a1", "best row's perplexity ratio <= 1.10 at 0.9 and <= 1.25 at 0.8, on every corpus", best),
                target("a2", "gfp (full, global) perplexity ratio <= 1.2 at 0.9 and <= 1.5 at 0.8, on every corpus", gfp),
                target("a3", "every activation-aware row (gfp, fluctuation, llm-surgeon) beats magnitude and random (global, same reconstruction) "
                             "at every budget, on every corpus", aware)]
    else:
        out.append(target("b", "gfp (full, global) fidelity on the other corpora >= 0.93 at 0.8 and >= 0.85 at 0.6", b_checks))
    out.append(target("c", "on every other corpus and budget, gfp/full/global at least as good as gfp/none/global and magnitude/none|full/uniform", c_checks))
    return out


# ---- output -------------------------------------------------------------------------------------


def cell(q: dict) -> str:
    if "perplexity_ratio" in q:
        return f"{q['perplexity']:.2f} (x{q['perplexity_ratio']:.3f})"
    return f"{q['relative_quality']:.4f}"


def markdown_table(result: dict, c: dict) -> str:
    calib = c["calibration_corpus"]
    labels = list(c["corpora"])
    decoder = c["quality_metric"] == "perplexity"
    if decoder:
        what = ("Perplexity on each corpus's evaluation examples, with its ratio to the dense model's (x1.00 = dense); dense: "
                + ", ".join(f"{k} {v:.2f}" for k, v in c["dense"].items()) + ".")
    else:
        what = "Fidelity (mean cosine similarity of sentence embeddings to the dense model's) on each corpus's evaluation examples."
    lines = [f"#### {result['model']}, calibrated on {calib}", "",
             f"{what} {c['calibration_examples']} calibration examples ({c['calibration_tokens']} tokens), statistics {c['calibrate_s']:.1f} s, "
             f"shared by every row but llm-surgeon. Plan s: the row's scores, search and reconstruction (llm-surgeon: all its shots, "
             f"its own curvature included). No latency: these rows are about quality (measured on the dense model masked as the pruned one).", "",
             "| method | recon | alloc | budget | MACs kept | heads | neurons | " + " | ".join(corpus_label(x, calib) for x in labels) + " | plan s | measure s |",
             "|---|---|---|---|---|---|---|" + "---|" * len(labels) + "---|---|"]
    for r in c["rows"]:
        lines.append(f"| {r['method']} | {r['reconstruction']} | {r['allocation']} | {r['budget']:.2f} | {r['kept_prunable_macs']:.3f} | "
                     f"{r['heads_kept']} | {r['neurons_kept']} | " + " | ".join(cell(r["quality"][x]) for x in labels)
                     + f" | {r['plan_s']:.1f} | {r['measure_s']:.1f} |")
    return "\n".join(lines)


def markdown_targets(result: dict) -> str:
    lines = [f"**Targets, {result['model']}** (issue 13)", ""]
    for t in result["targets"]:
        state = "not evaluated (no rows at its budgets)" if t["met"] is None else ("met" if t["met"] else "**not met**")
        passed = sum(ch["met"] for ch in t["checks"])
        lines.append(f"- ({t['target']}) {t['text']}: {state}" + (f" ({passed}/{len(t['checks'])})" if t["checks"] else ""))
        for ch in t["checks"]:
            lines.append(f"  - calib {ch['calib']}, budget {ch['budget']:.2f}, {ch['detail']}: {'met' if ch['met'] else 'not met'}")
    return "\n".join(lines)


def markdown(results: list[dict], header: str) -> str:
    parts = [header]
    for result in results:
        parts.append(f"### {result['model']}")
        parts += [markdown_table(result, c) for c in result["calibrations"].values()]
        parts.append(markdown_targets(result))
    return "\n\n".join(parts) + "\n"


def plot(results: list[dict], path: Path, calib: str = "pydoc") -> None:
    """Per model (rows) and other corpus (columns): quality vs budget for each method, calibrated
    on `calib` (else the first calibration corpus)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for result in results:
        c = result["calibrations"].get(calib) or next(iter(result["calibrations"].values()))
        others = [x for x in c["corpora"] if x != c["calibration_corpus"]] or [c["calibration_corpus"]]
        panels.append((result, c, others))
    ncols = max(len(o) for _, _, o in panels)
    fig, axes = plt.subplots(len(panels), ncols, figsize=(4.2 * ncols, 3.3 * len(panels)), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(["gfp", "fluctuation", "magnitude", "random", "llm-surgeon"])}
    for row_axes, (result, c, others) in zip(axes, panels):
        for ax, corpus in zip(row_axes, others):
            for key in dict.fromkeys((r["method"], r["reconstruction"], r["allocation"]) for r in c["rows"]):
                pts = sorted((r["budget"], r["quality"][corpus]["relative_quality"]) for r in c["rows"] if (r["method"], r["reconstruction"], r["allocation"]) == key)
                style, marker = (":", "s") if key[2] == "uniform" else ("--", "^") if key[1] == "none" else ("-", "o")
                ax.plot(*zip(*pts), marker=marker, markersize=4, linestyle=style, color=colors.get(key[0], "k"), label="/".join(key))
            ax.set_title(f"{result['model'].removeprefix('pkg:')}: {corpus} (calib {c['calibration_corpus']})", fontsize=8)
            ax.set_xlabel("budget (prunable MACs kept)", fontsize=7)
            ax.set_ylabel("fidelity" if c["quality_metric"] == "fidelity" else "dense ppl / pruned ppl", fontsize=7)
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        for ax in row_axes[len(others):]:
            ax.axis("off")
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    corpora = {}
    for calib in split(args.calib):  # read every corpus before any model, so a bad one fails first
        sources, others = read_other_corpora(calib, split(args.eval))
        corpora[calib] = (sources, others, read_examples(calib))
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine()}
    command = "python bench/transfer.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    header = (f"Generated by `{command}` ({env['threads']} torch threads, {env['machine']}); calibration examples as "
              f"`gfprune-ray prune --data CORPUS` picks them, evaluation examples as `--eval-data` does.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for source in split(args.models):
        results.append(bench_model(source, corpora, args))
        record = {"env": env, "args": {k: str(v) for k, v in vars(args).items()}, "wall_s": time.perf_counter() - start, "results": results}
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(results, header))
    plot(results, args.out.with_suffix(".png"))
    print(markdown(results, header))
    print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')} in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
