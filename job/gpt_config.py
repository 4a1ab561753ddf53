"""GPT-2's shapes, torch-free: the model config, the published sizes and the attention kernels' names. The trainer's
model (job/model.py) and the recipes' cards (job/recipes/, which the laptop's launcher reads without torch) share it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

GPT2_VOCAB = 50257
PADDED_VOCAB = 50304  # next multiple of 128: matmul shapes the GPU's kernels tile without a ragged edge


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = PADDED_VOCAB  # rows of wte/lm_head (padded)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def to_dict(self) -> dict:
        return asdict(self)


MODEL_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),  # trains on a laptop CPU in minutes
}

# --sdpa-backend's kernels (job.model.SDPA_BACKENDS maps them to torch's), besides "auto".
SDPA_BACKEND_NAMES = ("cudnn", "flash", "efficient", "math")
