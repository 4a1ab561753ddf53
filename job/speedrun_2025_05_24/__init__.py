"""The speedrun recipe's parts: a port of one pinned modded-nanogpt record (KellerJordan/modded-nanogpt,
records/track_1_short/2025-05-24_StableTorch, "21st record with latest torch": 1770 steps of 8 x 48K tokens, val loss
3.2830 in 180.8 s on 8xH100 as published).

- attention.py: the record's block-wise sliding-window, document-causal attention mask, as a FlexAttention BlockMask
  (CUDA) and as the same mask made dense for scaled_dot_product_attention (the CPU, and any batch FlexAttention's
  fast path does not take).
- fp8.py: the output layer's FP8 matmul with the record's fixed scales (GPUs with FP8 tensor cores).
- gpt.py: the model (rotary, QK-norm, ReLU², value embeddings, U-net skips, sigmoid softcap, untied FP8 head).
- muon.py: Muon (Newton-Schulz orthogonalised momentum), spread over the ranks as the record does.

The recipe that wires them into the trainer is job/recipes/speedrun_2025_05_24.py. This package's own module imports no torch:
the recipe's card reads its constants on the laptop too.
"""

import math

# What the recipe's card (torch-free) and the model share.
GPT2_VOCAB = 50257
LAYERS = 12
BLOCK = 128  # FlexAttention's block size in the record: sequence lengths and windows come in whole blocks


def next_multiple(v: float, n: int) -> int:
    return max(n, math.ceil(v / n) * n)
