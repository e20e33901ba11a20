"""The LM paper sizes (125m ... 1.3b) for Mamba2 and Gated DeltaNet: parameter counts within 5 % of
the Transformer's at every size (counted with `jax.eval_shape`, nothing allocated), the 125m train
step lowers on the paper's fsdp=8 mesh, and the experiments' smoke configs resolve and build.
Negative control: with the preset's FFN width (no matching) both are more than 5 % over."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from experiments import lm, mqar
from ttt.config import validate
from ttt.models import build_model, param_count
from ttt.models.param_match import block_params, matched_ffn_dim
from ttt.train.setup import abstract_meta, build_setup, lower_train_step, resolve_config

FAMILY = ("mamba2", "gated_deltanet")
needs8 = pytest.mark.skipif(jax.device_count() < 8,
                            reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _count(config) -> int:
    model = build_model(config.model)
    ids = jnp.zeros((1, 8), jnp.int32)
    return param_count(jax.eval_shape(model.init, jax.random.PRNGKey(0), ids))


def test_paper_presets_match_the_transformer():
    rows = []
    for preset in lm.PRESETS[1:]:
        softmax = _count(lm.get_config(f"softmax,{preset},paper"))
        for mixer in FAMILY:
            config = lm.get_config(f"{mixer},{preset},paper")
            count, ffn = _count(config), config.model.ffn_dim
            with config.unlocked():
                config.model.ffn_dim = None  # negative control: the preset's FFN
            unmatched = _count(config)
            rows.append(f"{preset:>5} {mixer:<15} ffn {ffn:>5} "
                        f"{count:>13,} / {softmax:>13,} = {count / softmax:.4f} "
                        f"(preset FFN: {unmatched / softmax:.3f})")
            assert abs(count / softmax - 1) <= 0.05, rows[-1]
            assert unmatched / softmax - 1 > 0.05, rows[-1]
    print("\n" + "\n".join(rows))


def test_matched_ffn_dim_identities():
    # the reference itself needs no change; a wider mixer gets a narrower FFN, by extra / 3C
    assert matched_ffn_dim("softmax", 64, 4, 256) == 256
    extra = block_params("mamba2", 64, 4, 1) - block_params("softmax", 64, 4, 1)
    want = 16 * round((256 - extra / (3 * 64)) / 16)
    assert matched_ffn_dim("mamba2", 64, 4, 256) == want < 256
    # the counts it matches: mixer_kwargs and the FFN width enter block_params
    assert block_params("mamba2", 64, 4, 2) - block_params("mamba2", 64, 4, 1) == 3 * 64
    assert block_params("mamba2", 64, 4, 1, (("d_state", 16),)) < block_params("mamba2", 64, 4, 1)
    with pytest.raises(ValueError, match="no FFN width"):
        matched_ffn_dim("mamba2", 64, 4, 16)
    # every non-tiny preset is matched, with or without `paper`
    config = lm.get_config("mamba2,125m")
    assert config.model.ffn_dim == matched_ffn_dim("mamba2", 768, 12, 2048)
    assert lm.get_config("mamba2,tiny").model.ffn_dim is None  # tiny keeps the preset's


@needs8
@pytest.mark.parametrize("mixer", FAMILY)
def test_125m_paper_train_step_lowers(mixer):
    config = lm.get_config(f"{mixer},125m,paper")
    meta = abstract_meta(config)
    lowered = lower_train_step(build_setup(resolve_config(config, meta), meta, build_model))
    assert "@main" in lowered.as_text()


@pytest.mark.parametrize("module,arg", [(lm, f"{m},smoke") for m in FAMILY]
                         + [(mqar, f"{m},smoke") for m in FAMILY])
def test_smoke_configs_resolve_and_build(module, arg):
    config = module.get_config(arg)
    validate(config, num_devices=1, process_count=1)
    with config.unlocked():
        config.model.vocab_size = config.data.get("vocab_size") or 257
    model = build_model(config.model)
    assert model.mixer == arg.split(",")[0]
    assert _count(config) > 0
