"""The speedrun port against the record's own code, in one process: same initial weights, same batches, the same
optimizer steps; per-step losses, how far the weights drift apart, and both step times.

    python scripts/bench_speedrun.py --record PATH [--device cuda] [--steps 8] [--size full|small] [--out FILE.json]

PATH is the record's train_gpt.py or its log (see scripts/speedrun_reference.py, which loads it the same way and
refuses another file; the record's code is read from there, never copied). --out is written (replaced) at the end,
and checked before the run. On CUDA both run as the record does: compiled, FlexAttention, the
record's FP8 output layer where the GPU has FP8, bf16 embeddings, one rank (the record's Muon all-gathers within a
one-process NCCL group). On the CPU (a smoke test of this script at --size small) the record's attention goes through
the dense element mask as in speedrun_reference.py, and nothing is compiled.

Step times exclude the first two steps of each (compilation). The port's step here is the model's forward and
backward and both optimizers, as the record's; the trainer around it (data, logging, checkpoints) is measured by
scripts/bench_train.py --set recipe=speedrun. docs/BENCHMARKS.md has the figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from job.errors import ArgumentParser, UserError, cli_main, int_arg  # noqa: E402
from job.optim import Optimizers  # noqa: E402
from job.recipes import speedrun_2025_05_24 as recipe  # noqa: E402
from job.speedrun_2025_05_24.fp8 import fp8_supported  # noqa: E402
from job.speedrun_2025_05_24.gpt import SpeedrunConfig, SpeedrunGPT  # noqa: E402
from job.speedrun_2025_05_24.muon import newton_schulz  # noqa: E402

SIZES = {"full": dict(n_head=6, n_embd=768, seq_len=48 * 1024), "small": dict(n_head=1, n_embd=128, seq_len=1024)}


def reference_module():
    spec = importlib.util.spec_from_file_location("speedrun_reference", ROOT / "scripts" / "speedrun_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_record(path: Path, source: str, device: str) -> dict:
    ref = reference_module()
    ns: dict = {"__name__": "record"}
    code = ref.definitions(source) if device == "cpu" else source.split("# int main")[0]
    exec(compile(code, str(path), "exec"), ns)  # noqa: S102 - the record's code, fetched by the user
    if device == "cpu":
        ns["dist"] = ref.OneRank()
        ns["flex_attention"] = ref.dense_flex
    return ns


def batches(n: int, seq_len: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, 50256, (seq_len + 1,), generator=g)
        tokens[torch.randint(0, seq_len, (seq_len // 900,), generator=g)] = 50256  # documents ~900 tokens long
        tokens[0] = 50256
        out.append(tokens.to(device))
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_record(ns, size, device, data, steps, cfg):
    torch.manual_seed(0)
    model = ns["GPT"](vocab_size=50257, num_layers=12, num_heads=size["n_head"], model_dim=size["n_embd"],
                      max_seq_len=size["seq_len"]).to(device)
    if device == "cuda":
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                m.bfloat16()
    else:
        model.lm_head.use_fp8 = False
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adam, muon = reference_module().record_optimizers(ns, model)
    fwd = torch.compile(model, dynamic=False) if device == "cuda" else model

    def step(i):
        tokens = data[i]
        window = torch.tensor(recipe.window_blocks(i, cfg.max_steps), dtype=torch.int32, device=device)
        loss = fwd(tokens[:-1].int(), tokens[1:], window)
        loss.backward()
        for opt in (adam, muon):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * recipe.lr_factor(i, cfg.max_steps)
        for group in muon.param_groups:
            group["momentum"] = recipe.muon_momentum(i)
        adam.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        return loss.item() / size["seq_len"]

    return init, model, step


def run_port(init, size, device, steps, cfg, data):
    model = SpeedrunGPT(SpeedrunConfig(n_head=size["n_head"], n_embd=size["n_embd"], block_size=size["seq_len"])).to(device)
    if device == "cuda":
        for m in model.modules():
            if isinstance(m, torch.nn.Embedding):
                m.to(torch.bfloat16)
        model.lm_head.use_fp8 = fp8_supported(device)
    model.load_state_dict(init)
    opts = Optimizers(recipe.RECIPE.build_optimizers(model, cfg, device))
    if device == "cpu":  # the record's Newton-Schulz is compiled and bf16 wherever it runs
        opts.optimizers[1].ns_dtype = torch.bfloat16
        opts.optimizers[1].orthogonalize = torch.compile(newton_schulz)
    fwd = torch.compile(model) if device == "cuda" else model

    def step(i):
        tokens = data[i]
        recipe.RECIPE.model_schedule(model, i, cfg)
        _, loss = fwd(tokens[None, :-1], tokens[None, 1:])
        (loss * size["seq_len"]).backward()
        recipe.RECIPE.schedule(opts, i, cfg)
        opts.step()
        opts.zero_grad()
        return loss.item()

    return model, step


def timed(step, steps, device) -> tuple[list[float], list[float]]:
    losses, times = [], []
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        losses.append(step(i))
        sync(device)
        times.append(time.perf_counter() - t0)
    return losses, times


@cli_main
def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", type=Path, required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--steps", type=int_arg(1), default=8)
    p.add_argument("--size", choices=tuple(SIZES), default="full")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    ref = reference_module()
    # Everything that can be refused is refused before the run: the output first, then the record's code.
    ref.check_record_path(args.record)
    if args.out:
        ref.check_out_file(args.out, "bench_speedrun.json")
    source = ref.read_record(args.record)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: this machine has no CUDA GPU: use --device cpu --size small")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    # the recipe reads the run's length and its own hyperparameters (the record's, as the defaults are)
    size, cfg = SIZES[args.size], types.SimpleNamespace(max_steps=recipe.RECORD_STEPS, hp=recipe.Hparams())
    ns = load_record(args.record, source, args.device)
    data = batches(args.steps, size["seq_len"], args.device)
    init, rec_model, rec_step = run_record(ns, size, args.device, data, args.steps, cfg)
    port_model, port_step = run_port(init, size, args.device, args.steps, cfg, data)
    rec_losses, rec_times = timed(rec_step, args.steps, args.device)
    port_losses, port_times = timed(port_step, args.steps, args.device)
    drifts = {name: ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
              for (name, a), b in zip(port_model.state_dict().items(), rec_model.state_dict().values(), strict=True)}
    worst = max(drifts, key=drifts.get)
    warm = slice(2, None) if args.steps > 3 else slice(None)
    ms = lambda ts: 1000 * sum(ts[warm]) / len(ts[warm])  # noqa: E731
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "size": args.size, "steps": args.steps, "record_losses": rec_losses, "port_losses": port_losses,
              "max_loss_diff": max(abs(a - b) for a, b in zip(rec_losses, port_losses, strict=True)),
              "max_weight_drift": drifts[worst], "most_drifted": worst, "record_ms": ms(rec_times), "port_ms": ms(port_times),
              "port_speed_vs_record": ms(rec_times) / ms(port_times)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
