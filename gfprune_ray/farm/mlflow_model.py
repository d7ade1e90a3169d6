"""A pruned model as an MLflow model: registrable, servable, loadable with `mlflow.pyfunc.load_model`.

MLflow's transformers flavor rebuilds a model from its config with the architecture's own class,
which has the same width in every layer; a pruned model's layers keep different numbers of heads
and neurons, so only `gfprune_ray.load_pruned` builds it. This file is therefore a pyfunc model
"from code" (MLflow runs this file to load it; nothing is pickled) around the saved folder:
`predict` takes texts and returns mean-pooled, L2-normalised last hidden states (sentence
embeddings), and `unwrap_python_model().model` is the torch model itself (for generation).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

ARTIFACT = "pruned_model"  # the saved folder, as an artifact of the MLflow model


class PrunedModel(PythonModel):
    def load_context(self, context) -> None:
        import transformers

        from gfprune_ray.data import prepare_tokenizer
        from gfprune_ray.surgery import load_pruned

        folder = context.artifacts[ARTIFACT]
        self.model = load_pruned(folder).eval()
        self.tokenizer = prepare_tokenizer(transformers.AutoTokenizer.from_pretrained(folder))

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[list[float]]:
        from gfprune_ray.data import tokenize
        from gfprune_ray.evaluate import sentence_embeddings

        texts = [str(text) for text in model_input]
        limit = getattr(self.model.config, "max_position_embeddings", 512)
        batches = tokenize(self.tokenizer, texts, seq_len=min(limit, 512), batch_size=32)
        return sentence_embeddings(self.model, batches).tolist()


mlflow.models.set_model(PrunedModel())
