"""Sample from a checkpoint: `python -m job.sample --checkpoint log/model_19073.pt --prompt "Hello" --num 4`."""

from __future__ import annotations

import argparse
import os

import torch

from job import checkpoint as ckpt_lib
from job.errors import UserError, cli_main
from job.model import GPT, GPTConfig
from job.tokenizer import decode, encode


def generate_samples(model: GPT, prompt: str, num: int, max_tokens: int, seed: int, device: str,
                     top_k: int = 50, temperature: float = 1.0) -> list[str]:
    """`num` continuations of `prompt`, reproducible for a given seed (its own generator, so sampling
    during training never disturbs the training RNG)."""
    tokens = encode(prompt)
    if not tokens:
        raise UserError("the prompt is empty: pass some text with --prompt")
    idx = torch.tensor([tokens] * num, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(idx, max_tokens, top_k=top_k, temperature=temperature, generator=gen)
    finally:
        model.train(was_training)
    return [decode(row.tolist()) for row in out]


def resolve_checkpoint(path) -> str:
    """A log dir stands for its newest checkpoint."""
    if os.path.isdir(path):
        found = ckpt_lib.list_checkpoints(path)
        if not found:
            raise UserError(f"{path} holds no model_*.pt checkpoints: train first or pass a checkpoint file")
        return str(found[-1][1])
    return str(path)


def load_model(path, device: str) -> tuple[GPT, dict]:
    ckpt = ckpt_lib.load(path)
    if "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a model checkpoint (no 'model'/'config' keys): pass a model_*.pt from a log dir")
    cfg = {k: v for k, v in ckpt["config"].items() if k in GPTConfig.__dataclass_fields__}
    model = GPT(GPTConfig(**cfg))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


@cli_main
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m job.sample", description="Generate text from a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a model_*.pt file, or a log dir (its newest checkpoint)")
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--num", type=int, default=4, help="number of samples")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per sample")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default=None, help="cuda | mps | cpu (default: best available)")
    args = p.parse_args(argv)
    if args.num < 1 or args.max_tokens < 1 or args.top_k < 1 or args.temperature <= 0:
        raise UserError("--num, --max-tokens and --top-k must be >= 1 and --temperature > 0")
    device = args.device or default_device()
    path = resolve_checkpoint(args.checkpoint)
    model, ckpt = load_model(path, device)
    print(f"# {path}: step {ckpt.get('step')}, val loss {ckpt.get('val_loss')}")
    for i, text in enumerate(generate_samples(model, args.prompt, args.num, args.max_tokens, args.seed, device,
                                              args.top_k, args.temperature)):
        print(f"sample {i}: {text}")


if __name__ == "__main__":
    main()
