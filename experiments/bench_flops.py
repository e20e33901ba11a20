"""FLOP counts of the sequence mixers, written down from the math (one multiply-add = 2 FLOPs).

Counts are per layer call at batch 1: N tokens, width C, H heads of d = C / H, mini-batch b.
Forward only; forward+backward is counted as 3× the forward (each matmul Y = X W costs one more
matmul for dX and one for dW), the usual convention. Elementwise work (LayerNorm, GELU, RoPE,
sigmoid gates) is left out: it is O(N C) against the O(N C²) of the projections.

What each count includes:
- projections: 2 N C² per dense C→C map (four for attention and TTT-transformer: q, k, v, o;
  Mamba backbone: q, v, gate, o plus two depthwise convolutions of width 4); the TTT learning-rate
  gate x·k_h is 2 N C H.
- softmax attention: the implementation forms the full N×N score matrix and masks it, so
  QKᵀ and PV cost 2 N² d each per head (the causal half is not subtracted).
- linear attention, chunked (chunk c): per head 4 N c d (intra-chunk scores and their product
  with V) + 4 N d² (inter-chunk q S and the state update kᵀv); cumulative form: 4 N d².
- TTT dual form, per head and mini-batch, for each dense layer l with input width d_l and output
  width e_l: keys X_k W (2 b d_l e_l), queries X_q W (2 b d_l e_l), X_q X_kᵀ (2 b² d_l),
  (η ⊙ ·) G (2 b² e_l), tril(η) G for the bias (2 b² e_l), state update X_kᵀ (η G) (2 b d_l e_l);
  plus, for a 2-layer MLP, the backward of the keys' layer 2 to get G_1 (2 b e_2 d_2).
- TTT primal form, per head and mini-batch, per dense layer: keys X_k W (2 b d e), per-token
  gradients X_kᵀ G as b outer products (2 b d e), the b states W_i = W − Σ_j η_ij g_j
  (2 b² d e), answers X_q W_i (2 b d e); MLP: the layer-2 backward as in the dual form.
"""

from __future__ import annotations


def projections(N: int, C: int, H: int, kind: str) -> float:
    """FLOPs of a mixer's projections: kind "attention" | "ttt" | "ttt_mamba"."""
    dense = 4 * 2.0 * N * C * C
    if kind == "attention":
        return dense
    gate = 2.0 * N * C * H  # the learnable-η logits x·k_h
    if kind == "ttt":
        return dense + gate
    if kind == "ttt_mamba":
        return dense + gate + 2 * 2.0 * N * C * 4  # two depthwise convs of width 4
    raise ValueError(f"kind: expected 'attention', 'ttt' or 'ttt_mamba', got {kind!r}")


def _ttt_layers(d: int, learner: str, mlp_factor: int = 4) -> list[tuple[int, int]]:
    """(input width, output width) of each dense layer of the inner model."""
    if learner == "linear":
        return [(d, d)]
    h = mlp_factor * d
    return [(d, h), (h, d)]


def ttt_core(N: int, H: int, d: int, b: int, learner: str, form: str) -> float:
    """FLOPs of the inner loop (all heads), dual or primal form."""
    M = -(-N // b)  # mini-batches (a final partial one is padded and costs a full one)
    layers = _ttt_layers(d, learner)
    per_mb = 0.0
    for din, dout in layers:
        if form == "dual":
            per_mb += 3 * 2.0 * b * din * dout + 2.0 * b * b * din + 2 * 2.0 * b * b * dout
        else:
            per_mb += 3 * 2.0 * b * din * dout + 2.0 * b * b * din * dout
    if len(layers) == 2:
        h, d_out = layers[1]
        per_mb += 2.0 * b * h * d_out  # backward through layer 2 of the keys' forward
    return H * M * per_mb


def mixer_flops(spec: dict, N: int, C: int, H: int) -> float:
    """Forward FLOPs of one mixer call; spec holds "family" and its options (see MIXERS)."""
    d = C // H
    fam = spec["family"]
    if fam == "softmax":
        return projections(N, C, H, "attention") + H * 4.0 * N * N * d
    if fam == "linear_attention":
        if spec.get("form", "chunked") == "chunked":
            c = spec.get("chunk", 64)
            core = H * (4.0 * N * c * d + 4.0 * N * d * d)
        else:
            core = H * 4.0 * N * d * d
        return projections(N, C, H, "attention") + core
    if fam == "ttt":
        kind = "ttt_mamba" if spec.get("backbone") == "mamba" else "ttt"
        core = ttt_core(N, H, d, spec.get("mini_batch", 16), spec["learner"],
                        spec.get("form", "dual"))
        return projections(N, C, H, kind) + core
    raise ValueError(f"unknown mixer family {fam!r}")
