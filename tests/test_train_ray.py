"""CoFi and FLOP under Ray Train: a run resumes whatever moment it was killed at."""

from __future__ import annotations

import torch

from conftest import make_tokenizer, save_tiny, tiny_batches
from gfprune_ray.data import mean_tokens_per_sequence, with_labels
from gfprune_ray.train_ray import TrainJob, fit, read_outcome
from gfprune_ray.training import Schedule


def test_a_finished_run_killed_before_its_model_was_saved_returns_its_outcome_again(local_ray, tmp_path):
    """The final checkpoint holds the cut student (narrower than the model a run starts from).
    `prune` killed after it but before saving the model runs `fit` again with the same name: it
    must give that outcome again, not try to load the cut state into a full-size student."""
    source = save_tiny(tmp_path / "model", "bert", 0, make_tokenizer(tmp_path))
    batches = tiny_batches(n_batches=2)
    schedule = Schedule(steps=8, budget=0.5, seed=0, checkpoint_every=4)
    job = TrainJob(str(source), "cofi", schedule, with_labels(batches, None), mean_tokens_per_sequence(batches), "unit", str(tmp_path / "runs"))
    first_model, first = read_outcome(fit(job))
    assert len(first["curve"]) == schedule.total_steps and first["kept_prunable_macs"] <= 0.5 + 1e-9
    again_model, again = read_outcome(fit(job))
    assert again == first
    for (name, p), (_, q) in zip(first_model.state_dict().items(), again_model.state_dict().items()):
        assert torch.equal(p, q), name
