"""Import and export of the official TTT parameter trees (docs/design.md §11).

- `ttt.interop.ttt_lm_jax`: ttt-lm-jax `CausalLM` trees and checkpoint files <-> our `CausalLM`.
- `ttt.interop.mttt`: one mttt `TTTLayer` <-> our `MTTTMixer`.
- `ttt.interop.trees`: the '/'-path tree helpers both mappings use.
"""

from ttt.interop.mttt import export_mttt_layer, import_mttt_layer
from ttt.interop.ttt_lm_jax import (
    export_ttt_lm_jax,
    import_ttt_lm_jax,
    load_ttt_lm_jax_checkpoint,
    ttt_lm_jax_config,
)

__all__ = [
    "export_mttt_layer",
    "export_ttt_lm_jax",
    "import_mttt_layer",
    "import_ttt_lm_jax",
    "load_ttt_lm_jax_checkpoint",
    "ttt_lm_jax_config",
]
