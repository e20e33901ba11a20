"""The accelerator script `experiments/gpu_paper.py` (the paper's 125M configs, 20 steps at
batch 16 x 2048) runs end to end on the CPU at a toy size and writes its JSON and table."""

from __future__ import annotations

import json

import pytest

from experiments import gpu_paper


@pytest.mark.parametrize("mixers", ["softmax", pytest.param("ttt_linear,ttt_mlp",
                                                            marks=pytest.mark.slow)])
def test_gpu_paper_script_on_the_cpu(tmp_path, mixers):
    result = gpu_paper.main(["--out", str(tmp_path), "--preset", "tiny", "--ctx", "32",
                             "--batch", "2", "--steps", "3", "--mixers", mixers,
                             "--peak-tflops", "1"])
    saved = json.load(open(tmp_path / "gpu_paper_tiny_32.json"))
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    for row in saved["rows"]:
        assert "error" not in row, row
        assert len(row["runs"]) == 3 and row["tokens_per_s"] > 0 and row["xla_bytes"] > 0
        assert row["model_flops"] > 0 and row["params"] > 0
        assert row["peak_bytes_in_use"] is None  # a CPU keeps no memory statistics
    config = gpu_paper.paper_config("softmax", "125m", 2048, 16, 20)
    assert (config.model.dtype, config.model.remat) == ("bfloat16", "block")  # the paper recipe
    assert config.train.global_batch_size == 16 and config.train.parallel == "single"
    table = (tmp_path / "gpu_paper_tiny_32.md").read_text()
    assert "| softmax |" in table or "| ttt_linear |" in table
