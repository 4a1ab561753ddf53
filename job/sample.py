"""Sample from a checkpoint: `python -m job.sample --checkpoint log/model_19073.pt --prompt "Hello" --num 4`."""

from __future__ import annotations

import argparse
import re

from job.config import SEED_MAX, UPPER_LIMITS
from job.errors import ArgumentParser, UserError, cli_main, float_arg, int_arg

DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")


def generate_samples(model, prompt: str, num: int, max_tokens: int, seed: int, device: str,
                     top_k: int = 50, temperature: float = 1.0) -> list[str]:
    """`num` continuations of `prompt`, reproducible for a given seed (its own generator, so sampling
    during training never disturbs the training RNG)."""
    import torch

    from job.tokenizer import decode, encode

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


def default_device() -> str:
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: str | None) -> str:
    """The device to sample on; one asked for that this machine lacks is refused before the checkpoint is read."""
    import torch

    if device is None:
        return default_device()
    kind = device.split(":")[0]
    have = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}[kind]
    if kind == "cuda" and have and ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
        have = False
    if not have:
        raise UserError(f"--device {device}: this machine has no such device: use --device cpu, or leave --device out")
    return device


def device_arg(text: str) -> str:
    if not DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"takes cuda, cuda:N, mps or cpu, got {text!r}")
    return text


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m job.sample", description="Generate text from a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="a model_*.pt file, or a log dir (its newest checkpoint)")
    p.add_argument("--prompt", default="Hello, I'm a language model,")
    p.add_argument("--num", type=int_arg(1, UPPER_LIMITS["sample_num"]), default=4, help="number of samples")
    p.add_argument("--max-tokens", type=int_arg(1, UPPER_LIMITS["sample_tokens"]), default=64, help="tokens to generate per sample")
    p.add_argument("--top-k", type=int_arg(1), default=50)
    p.add_argument("--temperature", type=float_arg(above=0), default=1.0)
    p.add_argument("--seed", type=int_arg(0, SEED_MAX), default=42)
    p.add_argument("--device", type=device_arg, default=None, help="cuda | mps | cpu (default: best available)")
    return p


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.prompt:
        raise UserError("the prompt is empty: pass some text with --prompt")
    from job.checkpoint import load_model, resolve_checkpoint  # imports torch: after the command line is read

    path = resolve_checkpoint(args.checkpoint)
    device = check_device(args.device)
    model, ckpt = load_model(path, device)
    code = (ckpt.get("identity") or {}).get("commit")  # the commit that trained it (job/identity.py)
    code = code if isinstance(code, str) else None
    print(f"# {path}: step {ckpt.get('step')}, val loss {ckpt.get('val_loss')}" + (f", code {code[:12]}" if code else ""))
    for i, text in enumerate(generate_samples(model, args.prompt, args.num, args.max_tokens, args.seed, device,
                                              args.top_k, args.temperature)):
        print(f"sample {i}: {text}")


if __name__ == "__main__":
    main()
