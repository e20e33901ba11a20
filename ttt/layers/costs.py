"""What a mixer costs, written down from the math: forward FLOPs and recurrent state size.

Every function takes the mixer's *resolved* attributes (`MixerSpec.attrs(...)`: the module's
defaults, then the registry's, then the caller's), so a count follows the options that change the
work (mini-batch, inner form, learner, backbone, chunk, steps, ...). The registry attaches one FLOP
function and one state function to each entry; benchmarks and reports read them from there.

FLOPs (one multiply-add = 2 FLOPs) are per layer call at batch 1: N tokens, width C, H heads of
d = C / H, mini-batch b. Forward only; forward+backward is usually counted as 3× the forward (each
matmul Y = X W costs one more matmul for dX and one for dW). Elementwise work (LayerNorm, GELU,
RoPE, sigmoid gates, softmax) is left out: it is O(N C) against the O(N C²) of the projections.

- projections: 2 N C² per dense C→C map (four for attention and TTT-transformer: q, k, v, o;
  Mamba backbone: q, v, gate, o plus two depthwise convolutions of width conv_width); the TTT
  learning-rate gate x·k_h is 2 N C H (only with learn_eta).
- softmax attention: the implementation forms the full N×N score matrix and masks it, so
  QKᵀ and PV cost 2 N² d each per head (the causal half is not subtracted).
- linear attention, chunked (chunk c): per head 4 N c d (intra-chunk scores and their product
  with V) + 4 N d² (inter-chunk q S and the state update kᵀv); cumulative form and the non-causal
  layer (one global state): 4 N d²; quadratic form: 4 N² d.
- TTT dual form, per head and mini-batch, for each dense layer l with input width d_l and output
  width e_l: keys X_k W (2 b d_l e_l), queries X_q W (2 b d_l e_l), X_q X_kᵀ (2 b² d_l),
  (η ⊙ ·) G (2 b² e_l), tril(η) G for the bias (2 b² e_l), state update X_kᵀ (η G) (2 b d_l e_l);
  plus, for a 2-layer MLP, the backward of the keys' layer 2 to get G_1 (2 b e_2 d_2). A final
  partial mini-batch is padded and costs a full one; mini_batch=0 is one mini-batch of N.
- TTT primal form, per head and mini-batch, per dense layer: keys X_k W (2 b d e), per-token
  gradients X_kᵀ G as b outer products (2 b d e), the b states W_i = W − Σ_j η_ij g_j
  (2 b² d e), answers X_q W_i (2 b d e); MLP: the layer-2 backward as in the dual form.
- TTT with stats=True also pays for its diagnostics: the inner model at W0 on every key, and one
  more inner pass over the sequence with every mini-batch doubled (mini-batch 2b).
- MTTT, per head: ψ, φ and the output map H are 2 N C² each over all heads; each of the T inner
  steps reconstructs every token through f and the decoder G (d→C) and back-propagates to W
  ("sgd": the full-set loss, plus forward and backward on its chunk of ⌈N/T⌉ tokens); then the
  loss at W_T and the answers f(ψ(x); W_T).

- LaCT (`lact`, H_f fast-weight heads of d_f = C / H_f, SwiGLU hidden h, chunk n, window w):
  one (C, 3C) projection and Wo (as four C→C maps); the η (3 H_f), momentum (H_f) and output
  scale (H_f) logits; per fast-weight head, 6 d_f h per query (through W1, W3, W2) and 12 d_f h
  per key of an update the output reads (through W1, W3: 4 d_f h; E = D W2ᵀ: 2 d_f h; the three
  weight gradients: 6 d_f h; the squared-error loss also needs the keys' output: + 2 d_f h);
  Muon adds, per such update and weight matrix (m ≤ n its sides), 5 Newton–Schulz steps of
  4 m² n + 2 m³. Causal, the last chunk's update is read by no query (only by the decode state
  or an open chunk): ⌈N/n⌉ − 1 updates, none at N ≤ n; the window attention
  counts the (query, key) pairs the window holds, 4 (C / H) per pair and head (QKᵀ and PV): the
  math, not the blocked implementation's masked padding (w + block − 1 keys per query block).
- DeltaNet / Gated DeltaNet (`deltanet`, `gated_deltanet`; d = C / H key and d_v = expand_v d
  value channels per head, chunk c, conv width w): q, k (C→C), v, the output gate (C→H d_v) and
  W_o (H d_v→C); β (and the gate's a) logits, 2 N C H each; the depthwise convolutions of the
  2C + H d_v channels, 2 w per channel and token; the chunked delta rule per head and chunk (a
  final partial chunk is padded and costs a full one): K Kᵀ and Q Kᵀ (2 c² d each), the
  inverse T = (I + A)⁻¹ by block doubling (two s³ products per pair of s-blocks and level:
  ⅔ (P³ − P) for P the next power of two ≥ c), W = T K and U₀ = T V (2 c² d, 2 c² d_v), the
  intra-chunk product with U (2 c² d_v), W S, Q S and the state update Kᵀ U (2 c d d_v each);
  the recurrent form, per head and token, Sᵀk, k uᵀ and Sᵀq (2 d d_v each).
- Sliding-window attention (`swa`, window w): four C→C maps and, like LaCT's window branch,
  4 (C / H) per (query, key) pair the window holds and head.
- Mamba2 (`mamba2`; E = expand·C inner width, h = E / P heads of P, d_state n, conv width w,
  chunk c): the in-projection C→2E + 2n + h and the out-projection E→C; the depthwise convolution
  of the E + 2n channels (2 w per channel and token); the SSD scan per head as linear attention
  with key width n and value width P (B and C are broadcast to every head, and counted so):
  chunked 2 N c (n + P) + 4 N n P, quadratic 2 N² (n + P), cumsum (the token scan) 4 N n P.

- Titans (`titans`, memory f of dense layers (d_l, e_l), chunk b): five C→C maps (q, k, v, the
  output gate, o), the θ, η, α logits (2 N C · 3H) and one depthwise convolution over 3C
  channels; per head and chunk, the primal TTT step above (the memory's learning-rate matrix is
  Ω diag(θ)), plus the rows γ_i W_0 + m_i S_0 (4 b per weight), the carried momentum Σ_j c_j u_j
  (2 b per weight) and Ω = D E (2 b³).

State sizes are floats per layer per sequence (what a recurrent model carries from token to
token; the x-axis of the MQAR comparison): TTT, the inner model's weights (and biases) over all
heads; linear attention, S = Σ φ(k) vᵀ (and s = Σ φ(k) when normalised); softmax attention, the
KV cache of N tokens, 2 N C; MTTT, the inner model's weights (rebuilt for every sequence); LaCT,
the fast weights, the inner optimizer's state (momentum / Muon one copy of them, Adam two) and the
window's KV cache, 2 min(w, N) C; Titans, three copies of the memory's weights (W, its momentum S
and the open chunk's starting W, where the chunk's gradients are taken).
Mamba2: S (n × P per head, E n in all) and the convolution's tail, (w − 1)(E + 2n).
DeltaNet: S (d × d_v per head) and the convolutions' tails, (w − 1)(2C + H d_v); sliding-window
attention: the ring buffers of w keys and values, 2 w C whatever N (they are allocated whole).
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def dense(N: int, C: int, maps: int = 4) -> float:
    """FLOPs of `maps` dense C→C projections of N tokens."""
    return maps * 2.0 * N * C * C


def inner_layers(d: int, learner, mlp_factor: int = 4) -> list[tuple[int, int]]:
    """(input width, output width) of each dense layer of a TTT / MTTT inner model.

    `learner` is a name of the learner registry or a `ttt.ops.Learner`; for one without a dense
    chain every weight of two or more axes counts as one layer (an estimate of its FLOPs)."""
    if learner == "linear":
        return [(d, d)]
    if learner == "mlp":
        h = mlp_factor * d
        return [(d, h), (h, d)]
    built, shapes = _learner_shapes(d, learner, mlp_factor)
    names = [w for w, _ in built.dense] if built.dense else sorted(shapes)
    return [(math.prod(shapes[n].shape[:-1]), shapes[n].shape[-1]) for n in names
            if len(shapes[n].shape) >= 2]


def _learner_shapes(d: int, learner, mlp_factor: int, bias: bool = True):
    """(the built learner, the shapes of one head's W) of a registered or given learner."""
    import jax

    from ttt.ops.learners import build_learner

    built = build_learner(learner, bias=bias, mlp_factor=mlp_factor)
    return built, jax.eval_shape(lambda key: built.init(key, d), jax.random.PRNGKey(0))


def inner_state_floats(d: int, learner, mlp_factor: int, bias: bool) -> int:
    """Floats of one head's inner state W (exact for any learner)."""
    if learner in ("linear", "mlp"):
        return inner_floats(inner_layers(d, learner, mlp_factor), bias)
    _, shapes = _learner_shapes(d, learner, mlp_factor, bias)
    return sum(math.prod(s.shape) for s in shapes.values())


def inner_floats(layers: list[tuple[int, int]], bias: bool) -> int:
    """Floats of one head's inner weights (and biases)."""
    return sum(din * dout + (dout if bias else 0) for din, dout in layers)


def ttt_core(N: int, H: int, b: int, layers: list[tuple[int, int]], form: str) -> float:
    """FLOPs of the causal TTT inner loop over all heads, dual or primal form."""
    M = -(-N // b)  # mini-batches (a final partial one is padded and costs a full one)
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


# ----------------------------------------------------------------------------- forward FLOPs


def softmax_flops(N: int, C: int, H: int, attrs: Mapping) -> float:
    d = C // H
    return dense(N, C) + H * 4.0 * N * N * d


def linear_core(N: int, d: int, form: str, chunk: int) -> float:
    """FLOPs of linear attention's core for one head of key and value width d."""
    if form == "chunked":
        return 4.0 * N * chunk * d + 4.0 * N * d * d
    if form == "quadratic":
        return 4.0 * N * N * d
    return 4.0 * N * d * d  # cumsum, or the non-causal global state


def linear_attention_flops(N: int, C: int, H: int, attrs: Mapping) -> float:
    form = attrs["form"] if attrs["causal"] else "global"
    return dense(N, C) + H * linear_core(N, C // H, form, attrs["chunk"])


def ttt_flops(N: int, C: int, H: int, attrs: Mapping) -> float:
    d = C // H
    b = attrs["mini_batch"] or N
    form = attrs["form"]
    if form == "auto":  # the dual form where the learner is a dense chain (the shipped ones are)
        chain = attrs["learner"] in ("linear", "mlp") or bool(
            _learner_shapes(d, attrs["learner"], attrs["mlp_factor"])[0].dense)
        form = "dual" if chain else "primal"
    layers = inner_layers(d, attrs["learner"], attrs["mlp_factor"])
    flops = dense(N, C) + ttt_core(N, H, b, layers, form)
    if attrs["learn_eta"]:
        flops += 2.0 * N * C * H  # the learnable-η logits x·k_h
    if attrs.get("gate"):
        flops += 2.0 * N * C * H  # the forget gate's logits x W_a
    if attrs["backbone"] == "mamba":
        flops += 2 * 2.0 * N * C * attrs["conv_width"]  # two depthwise convolutions
    if attrs["stats"]:
        flops += H * N * sum(2.0 * din * dout for din, dout in layers)  # answers at W0
        flops += ttt_core(2 * b * -(-N // b), H, 2 * b, layers, form)  # the doubled pass
    return flops


def window_pairs(N: int, w: int, causal: bool = True) -> int:
    """(query, key) pairs a sliding window of w holds over N tokens: Σ_t min(t + 1, w) causal,
    keys with |t − s| < w non-causal."""
    one_side = N * (N + 1) // 2 if N <= w else w * (w + 1) // 2 + (N - w) * w
    return one_side if causal else 2 * one_side - N


def lact_dims(C: int, attrs: Mapping) -> tuple[int, int, int]:
    """(H_f, d_f, h): fast-weight heads, their width and the SwiGLU hidden width."""
    Hf = attrs["fw_heads"]
    d = C // Hf
    return Hf, d, max(int(round(attrs["fw_hidden"] * d)), 1)


def newton_schulz_flops(m: int, n: int, steps: int = 5) -> float:
    """FLOPs of `steps` Newton–Schulz steps on an m × n matrix (A = X Xᵀ, A², (bA + cA²) X)."""
    m, n = min(m, n), max(m, n)
    return steps * (4.0 * m * m * n + 2.0 * m**3)


def lact_updates(N: int, chunk: int, causal: bool) -> int:
    """Chunk updates the output reads: causal, every chunk but the last (its update feeds only the
    decode state, or an open chunk after it: ⌈N/n⌉ − 1); non-causal, all ⌈N/n⌉."""
    chunks = -(-N // chunk)
    return chunks - 1 if causal else chunks


def lact_flops(N: int, C: int, H: int, attrs: Mapping) -> float:
    Hf, d, h = lact_dims(C, attrs)
    learned = attrs["learn_momentum"] and attrs["inner_opt"] in ("momentum", "muon")
    logits = 3 * Hf + (Hf if learned else 0) + (Hf if attrs["ttt_scale"] else 0)
    flops = dense(N, C) + 2.0 * N * C * logits
    updates = lact_updates(N, attrs["chunk"], attrs["causal"])
    updated = min(updates * attrs["chunk"], N)  # tokens whose gradients an update reads
    flops += Hf * (6.0 * N + (12.0 if attrs["loss"] == "dot" else 14.0) * updated) * d * h
    if attrs["inner_opt"] == "muon":
        flops += Hf * updates * (2 * newton_schulz_flops(d, h) + newton_schulz_flops(h, d))
    w = attrs["chunk"] if attrs["window"] is None else attrs["window"]
    if w:
        flops += 4.0 * C * window_pairs(N, w, attrs["causal"])  # H heads of C / H
    return flops


def mttt_flops(N: int, C: int, H: int, attrs: Mapping) -> float:
    dh = C // H
    layers = inner_layers(dh, attrs["learner"], attrs["mlp_factor"])
    f = sum(2.0 * din * dout for din, dout in layers)  # one token through f
    forward = f + 2.0 * dh * C  # ... and through the decoder G
    # dL/dW of one token: back through G (2 dh C), dW of every layer, dx of all but the first
    grad = 2.0 * dh * C + f + sum(2.0 * din * dout for din, dout in layers[1:])
    T = attrs["steps"]
    if attrs["mode"] == "sgd" and T:
        step = N * forward + math.ceil(N / T) * (forward + grad)
    else:
        step = N * (forward + grad)
    return dense(N, C, maps=3) + H * (T * step + N * forward + N * f)


def delta_dims(C: int, H: int, attrs: Mapping) -> tuple[int, int]:
    """(d, d_v): DeltaNet's key and value head dims."""
    d = C // H
    return d, int(attrs["expand_v"] * d)


def delta_flops(N: int, C: int, H: int, attrs: Mapping) -> float:
    d, dv = delta_dims(C, H, attrs)
    Cv = H * dv
    flops = 2.0 * N * C * (2 * C + 3 * Cv)  # q, k; v, the output gate, W_o
    flops += 2.0 * N * C * H * (2 if attrs["gate"] else 1)  # β (and a) logits
    flops += 2.0 * N * (2 * C + Cv) * attrs["conv_width"]
    return flops + H * delta_core(N, d, dv, attrs["form"], attrs["chunk"])


def delta_core(N: int, d: int, dv: int, form: str, chunk: int) -> float:
    """FLOPs of the delta rule for one head of key width d and value width dv."""
    if form == "recurrent":
        return N * 6.0 * d * dv
    c, P = chunk, 1 << max(chunk - 1, 0).bit_length()
    per_chunk = 6.0 * c * c * d + 4.0 * c * c * dv + 6.0 * c * d * dv + 2.0 * (P**3 - P) / 3
    return -(-N // c) * per_chunk


def swa_flops(N: int, C: int, H: int, attrs: Mapping) -> float:
    return dense(N, C) + 4.0 * C * window_pairs(N, attrs["window"])  # H heads of C / H


def mamba2_dims(C: int, attrs: Mapping) -> tuple[int, int, int]:
    """(E, P, h): Mamba2's inner width, head width and heads (one head of E if E < head_dim)."""
    E = attrs["expand"] * C
    P = min(attrs["head_dim"], E)
    return E, P, E // P


def mamba2_flops(N: int, C: int, H: int, attrs: Mapping) -> float:
    E, P, h = mamba2_dims(C, attrs)
    n, c, form = attrs["d_state"], attrs["chunk"], attrs["form"]
    flops = 2.0 * N * C * (2 * E + 2 * n + h) + 2.0 * N * E * C  # in- and out-projections
    flops += 2.0 * N * (E + 2 * n) * attrs["conv_width"]
    if form == "chunked":
        core = 2.0 * N * c * (n + P) + 4.0 * N * n * P
    elif form == "quadratic":
        core = 2.0 * N * N * (n + P)
    else:  # cumsum: the token scan
        core = 4.0 * N * n * P
    return flops + h * core


# ----------------------------------------------------------------------------- state sizes


def softmax_state(C: int, H: int, attrs: Mapping, N: int) -> int:
    return 2 * N * C


def linear_attention_state(C: int, H: int, attrs: Mapping, N: int) -> int:
    d = C // H
    return H * (d * d + (d if attrs["normalize"] else 0))


def ttt_state(C: int, H: int, attrs: Mapping, N: int) -> int:
    bias = attrs["learn_W0"] if attrs["inner_bias"] is None else attrs["inner_bias"]
    return H * inner_state_floats(C // H, attrs["learner"], attrs["mlp_factor"], bias)


def mttt_state(C: int, H: int, attrs: Mapping, N: int) -> int:
    return H * inner_state_floats(C // H, attrs["learner"], attrs["mlp_factor"],
                                  attrs["inner_bias"])


def lact_state(C: int, H: int, attrs: Mapping, N: int) -> int:
    Hf, d, h = lact_dims(C, attrs)
    copies = {"sgd": 1, "momentum": 2, "muon": 2, "adam": 3}[attrs["inner_opt"]]
    w = attrs["chunk"] if attrs["window"] is None else attrs["window"]
    return copies * Hf * 3 * d * h + 2 * min(w, N) * C


def mamba2_state(C: int, H: int, attrs: Mapping, N: int) -> int:
    E, P, h = mamba2_dims(C, attrs)
    return h * attrs["d_state"] * P + (attrs["conv_width"] - 1) * (E + 2 * attrs["d_state"])


def delta_state(C: int, H: int, attrs: Mapping, N: int) -> int:
    d, dv = delta_dims(C, H, attrs)
    return H * d * dv + (attrs["conv_width"] - 1) * (2 * C + H * dv)


def swa_state(C: int, H: int, attrs: Mapping, N: int) -> int:
    return 2 * attrs["window"] * C


def titans_flops(N: int, C: int, H: int, attrs: Mapping) -> float:
    d, b = C // H, attrs["mini_batch"]
    layers = inner_layers(d, attrs["learner"], attrs["mlp_factor"])
    weights = sum(din * dout for din, dout in layers)
    flops = dense(N, C, maps=5) + 2.0 * N * C * 3 * H + 2.0 * N * 3 * C * attrs["conv_width"]
    flops += ttt_core(N, H, b, layers, "primal")
    return flops + H * -(-N // b) * (6.0 * b * weights + 2.0 * b**3)


def titans_state(C: int, H: int, attrs: Mapping, N: int) -> int:
    layers = inner_layers(C // H, attrs["learner"], attrs["mlp_factor"])
    return 3 * H * inner_floats(layers, attrs["inner_bias"])
