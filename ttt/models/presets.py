"""Named model sizes.

LM sizes are the TTT-LM paper's (layers / width / heads / SwiGLU hidden, Llama-2 vocabulary of
32000); ViT sizes are big_vision's Ti and S (MLP hidden 4× width); docs/design.md §10.3.
`tiny` presets exist so tests and smoke runs compile in seconds.
"""

from __future__ import annotations

# kind -> preset -> dimensions. LM `vocab_size` is a default that model_config.vocab_size overrides.
PRESETS: dict[str, dict[str, dict[str, int]]] = {
    "lm": {
        "tiny": dict(num_layers=2, width=64, num_heads=4, ffn_dim=128, vocab_size=256),
        "125m": dict(num_layers=12, width=768, num_heads=12, ffn_dim=2048, vocab_size=32000),
        "350m": dict(num_layers=24, width=1024, num_heads=16, ffn_dim=2736, vocab_size=32000),
        "760m": dict(num_layers=24, width=1536, num_heads=16, ffn_dim=4096, vocab_size=32000),
        "1.3b": dict(num_layers=24, width=2048, num_heads=32, ffn_dim=5504, vocab_size=32000),
    },
    "vit": {
        "tiny": dict(num_layers=2, width=32, num_heads=2, mlp_dim=64),
        "Ti": dict(num_layers=12, width=192, num_heads=3, mlp_dim=768),
        "S": dict(num_layers=12, width=384, num_heads=6, mlp_dim=1536),
    },
}

# The size fields a model config may set itself; the rest (and any left None) come from the preset.
SIZE_FIELDS = {"lm": ("num_layers", "width", "num_heads", "ffn_dim", "vocab_size"),
               "vit": ("num_layers", "width", "num_heads", "mlp_dim")}


def _field(model_config, key: str):
    if hasattr(model_config, "get"):
        return model_config.get(key)
    return getattr(model_config, key, None)


def model_sizes(model_config) -> dict[str, int | None]:
    """The model's dimensions: {field: the config's value, else the preset's (None if neither)}.

    The one place a preset is merged into a model config: building the model, validating the
    config, writing the resolved config.json and reporting a run's size all read it. Values are
    not checked here (`ttt.models.build_model` does)."""
    kind = _field(model_config, "kind")
    preset = PRESETS.get(kind, {}).get(_field(model_config, "preset"), {})
    fields = dict.fromkeys((*SIZE_FIELDS.get(kind, ("num_layers", "width", "num_heads")),
                            *preset))
    return {key: preset.get(key) if _field(model_config, key) is None
            else _field(model_config, key) for key in fields}
