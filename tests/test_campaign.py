"""Campaign specs: models files, YAML campaigns, one schema, deterministic unit keys (no Ray here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gfprune_ray.farm.campaign import load_campaign, read_models_file
from gfprune_ray.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "local-model").mkdir()
    (tmp_path / "local-model" / "config.json").write_text("{}")
    return tmp_path


def test_models_file_lines_comments_and_overrides(folder):
    path = folder / "models.txt"
    path.write_text(
        "# a campaign\n\n"
        "pkg:all-minilm-l6-v2 budgets=0.9,0.7 method=gfp,magnitude   # packaged\n"
        "./local-model seq-len=64 task=embedding\n"
        "facebook/opt-125m task=lm\n"
    )
    entries = read_models_file(path)
    assert [e.source for e in entries] == ["pkg:all-minilm-l6-v2", str(folder / "local-model"), "facebook/opt-125m"]
    assert entries[0].budgets == [0.9, 0.7] and entries[0].methods == ["gfp", "magnitude"]
    assert entries[1].seq_len == 64 and entries[1].task == "embedding" and entries[1].name == "local-model"
    assert entries[2].name == "facebook--opt-125m" and entries[2].budgets is None


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("m budgets=1.5", "budgets.0: Input should be less than or equal to 1"),
        ("m budgets=0", "budgets.0: Input should be greater than 0"),
        ("m budgets=abc", "budgets.0: Input should be a valid number"),
        ("m method=nope", "methods.0: unknown method 'nope'"),
        ("m seq-len=0", "seq_len: Input should be greater than or equal to 1"),
        ("m task=bogus", "task: Input should be 'auto', 'embedding', 'lm' or 'classification'"),
        ("m colour=red", "unknown key 'colour'"),
        ("m budgets", "expected key=value after the model, got 'budgets'"),
        ("./missing-folder", "model folder not found: ./missing-folder"),
        ('m "unclosed', "No closing quotation"),
    ],
)
def test_a_malformed_line_names_file_line_and_reason(folder, line, reason):
    path = folder / "models.txt"
    path.write_text(f"# header\nok-model\n{line}\n")
    with pytest.raises(UserError) as err:
        read_models_file(path)
    assert str(err.value).startswith(f"{path}:3: "), str(err.value)
    assert reason in str(err.value)


def test_empty_and_missing_models_files(folder):
    (folder / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(UserError, match="no models"):
        read_models_file(folder / "empty.txt")
    with pytest.raises(UserError, match="models file not found"):
        read_models_file(folder / "absent.txt")


def test_yaml_campaign_is_validated_by_the_schema_and_options_override_it(folder):
    (folder / "models.txt").write_text("a-model\n")
    config = folder / "campaign.yaml"
    config.write_text("models: models.txt\nbudgets: [0.8, 0.6]\nmethods: [gfp]\nworkers: 2\nout: results\n")
    campaign = load_campaign(config, workers=1)
    assert campaign.workers == 1 and campaign.budgets == [0.8, 0.6]
    assert campaign.out == folder / "results", "paths in a campaign file are relative to the file"
    for text, reason in [
        ("models: models.txt\nworkers: 0\n", "workers: Input should be greater than or equal to 1"),
        ("models: models.txt\nbudget: [0.5]\n", "budget: Extra inputs are not permitted"),
        ("models: models.txt\nreconstruction: magic\n", "reconstruction: unknown reconstruction 'magic'"),
        ("models: []\n", "models: List should have at least 1 item"),
        ("models: [{source: x, budgets: [2]}]\n", "models.0.budgets.0: Input should be less than or equal to 1"),
        ("- just a list\n", "expected a mapping"),
        ("models: [unclosed\n", "not valid YAML"),
    ]:
        config.write_text(text)
        with pytest.raises(UserError) as err:
            load_campaign(config)
        assert str(err.value).startswith(f"{config}: ") and reason in str(err.value), str(err.value)


def test_budgets_out_of_range_on_the_command_line(folder):
    (folder / "models.txt").write_text("a-model\n")
    with pytest.raises(UserError, match=r"budgets.1: Input should be less than or equal to 1"):
        load_campaign(models=folder / "models.txt", budgets=[0.5, 1.2])
    with pytest.raises(UserError, match="no models"):
        load_campaign(budgets=[0.5])


def test_unit_keys_are_deterministic_and_follow_what_changes_results(folder):
    (folder / "models.txt").write_text("a-model budgets=0.5\nb-model\n")
    units = load_campaign(models=folder / "models.txt", budgets=[0.9, 0.8], methods=["gfp", "random"]).units()
    assert [u.label for u in units] == ["a-model/gfp-0.5", "a-model/random-0.5", "b-model/gfp-0.9", "b-model/gfp-0.8", "b-model/random-0.9", "b-model/random-0.8"]
    again = load_campaign(models=folder / "models.txt", budgets=[0.9, 0.8], methods=["gfp", "random"], out=folder / "elsewhere", workers=2)
    assert [u.key for u in again.units()] == [u.key for u in units], "where outputs go and how many workers run do not change a unit"
    other_seed = load_campaign(models=folder / "models.txt", budgets=[0.9, 0.8], methods=["gfp", "random"], seed=1)
    assert not {u.key for u in other_seed.units()} & {u.key for u in units}
    assert len({u.key for u in units}) == len(units)


def test_shot_step_keys_only_llm_surgeon_units_and_reconstruction_does_not(folder):
    (folder / "models.txt").write_text("a-model method=gfp,llm-surgeon\n")
    keys = lambda **options: {u.method: u.key for u in load_campaign(models=folder / "models.txt", budgets=[0.6], **options).units()}
    base = keys()
    assert keys(shot_step=0.2)["gfp"] == base["gfp"] and keys(shot_step=0.2)["llm-surgeon"] != base["llm-surgeon"]
    assert keys(reconstruction="scale")["llm-surgeon"] == base["llm-surgeon"], "llm-surgeon writes its own weights"
    assert keys(reconstruction="scale")["gfp"] != base["gfp"]
    for bad in (0, 1.5):
        with pytest.raises(UserError, match="shot_step"):
            load_campaign(models=folder / "models.txt", shot_step=bad)


def test_steps_key_only_training_units_and_checkpoint_interval_keys_nothing(folder):
    (folder / "models.txt").write_text("a-model method=gfp,cofi,flop\n")
    keys = lambda **options: {u.method: u.key for u in load_campaign(models=folder / "models.txt", budgets=[0.6], **options).units()}
    base = keys()
    assert keys(steps=10)["gfp"] == base["gfp"]
    assert keys(steps=10)["cofi"] != base["cofi"] and keys(steps=10)["flop"] != base["flop"]
    assert keys(checkpoint_every=7) == base, "how often a run checkpoints does not change its result"
    assert keys(reconstruction="scale")["cofi"] == base["cofi"], "cofi trains its own weights"
    with pytest.raises(UserError, match="steps"):
        load_campaign(models=folder / "models.txt", steps=0)


def test_repeated_model_names_get_distinct_output_names(folder):
    (folder / "models.txt").write_text("org/model seq-len=32\norg/model seq-len=64\n")
    campaign = load_campaign(models=folder / "models.txt", budgets=[0.5])
    assert campaign.names() == ["org--model", "org--model-2"]


def test_the_example_campaign_in_jobs_passes_the_schema():
    campaign = load_campaign(ROOT / "jobs" / "campaign.yaml")
    assert campaign.units() and campaign.models


def test_evaluation_corpora_in_yaml_are_a_list_or_a_comma_string_and_leave_unit_keys_alone(folder):
    (folder / "models.txt").write_text("a-model\n")
    config = folder / "campaign.yaml"
    config.write_text("models: models.txt\neval_data: [austen, licenses]\n")
    listed = load_campaign(config)
    config.write_text("models: models.txt\neval_data: austen, licenses\n")
    assert load_campaign(config).eval_data == listed.eval_data == ["austen", "licenses"]
    assert load_campaign(config, eval_data=["pydoc"]).eval_data == ["pydoc"], "the command line overrides the file"
    plain = load_campaign(models=folder / "models.txt")
    assert plain.eval_data == [] and [u.key for u in plain.units()] == [u.key for u in listed.units()]
    config.write_text("models: models.txt\neval_data: 3\n")
    with pytest.raises(UserError, match="eval_data"):
        load_campaign(config)
