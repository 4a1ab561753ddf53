"""A port of modded-nanogpt's record of 2026-07-17 (track 1, "MLP down projection in FP8"): its parts, one module each.

- transformer.py: the model (embeddings with bigram hashing, value embeddings, gates, paired heads, XSA, MUDD
  connections, FP8 MLPs and the FP8 soft-capped multi-token loss); rotary.py: its RoPE and YaRN; varlen.py: its
  attention within documents over a sliding window; kernels.py: the record's Triton and CUDA kernels as torch
  functions of the same arithmetic; triton_kernels.py: the port's own Triton kernels for some of them (CUDA, where
  triton is installed).
- normuon.py, polar_express.py, sparse_rows.py, param_table.py: the optimizer; schedule.py: the training schedule;
  bos_loader.py: the data loader.
"""
