"""The farm: a campaign of many models, methods and budgets on Ray, recorded in MLflow.

    campaign.py        what to run: the schema of models files and YAML, units and their keys
    sweep.py           the driver: prepare each model, submit its graph of Ray work, record results
    stages.py          the Ray stages: describe, collection actors, tree reduction, score, search,
                       reconstruct and evaluate tasks (each a remote call around a pure function)
    surgeon_shots.py   LLM Surgeon's shots as rounds of farm work
    train_units.py     cofi and flop units: a Ray Train run, then the same evaluation
    ray_data.py        reading, selecting and tokenizing the text with Ray Data
    tracking.py        MLflow: campaign > model > unit runs, resume lookups, store checks
    mlflow_model.py    a pruned model as an MLflow model (pyfunc from code)
    locking.py         one campaign at a time
    report.py          the summary table and plot

Nothing is imported here, so that importing one module (e.g. `mlflow_model`, which MLflow runs
to load a model) does not start Ray's imports.
"""
