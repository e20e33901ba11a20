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
