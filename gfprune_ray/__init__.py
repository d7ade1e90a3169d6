"""gfprune-ray: a batch compression farm for transformer language models.

Label-free structured pruning (heads and FFN neurons) with closed-form reconstruction; pruned
models are ordinary transformers classes with narrower layers:

    from gfprune_ray import load_pruned
    model = load_pruned("runs/minilm-0.6")
"""

__version__ = "0.1.0"


def load_pruned(path, dtype=None):
    """Load a model saved by gfprune-ray (see gfprune_ray.surgery.load_pruned)."""
    from .surgery import load_pruned as _load

    return _load(path, dtype)


__all__ = ["__version__", "load_pruned"]
