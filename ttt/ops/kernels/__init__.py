"""Fused accelerator kernels of the ops (Pallas), each equal to its XLA form in `ttt.ops`.

- ttt_dual: the dual-form mini-batch TTT loop (`ttt.ops.ttt.ttt_dual(kernel="pallas")`), one
  program per (sequence, head) holding the inner state on chip across mini-batches.

On a CPU the kernels run in Pallas interpret mode (slow, for tests); the XLA forms are the fast
path there.
"""
