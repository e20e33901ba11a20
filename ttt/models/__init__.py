"""ttt.models: causal LM and ViT classifier built from any sequence mixer, presets, sampling."""

from ttt.models.build import build_model, model_mixer, param_count, without_diagnostics
from ttt.models.generate import generate
from ttt.models.lm import CausalLM
from ttt.models.presets import PRESETS
from ttt.models.stack import stack_layers, unstack_layers
from ttt.models.vit import ViT

__all__ = ["CausalLM", "PRESETS", "ViT", "build_model", "generate", "model_mixer", "param_count",
           "stack_layers", "unstack_layers", "without_diagnostics"]
