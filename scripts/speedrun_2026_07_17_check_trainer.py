"""The 2026-07-17 record's own training loop against the trainer's (`python -m job.train --recipe speedrun`),
in one process on the CPU, from the same seed on the same shards: every step's loss, the validation losses, and every
weight at the end.

    python scripts/speedrun_2026_07_17_check_trainer.py --record PATH [--scheduled-steps 6] [--extension-steps 2]
        [--batch-divisor 32] [--n-embd 64] [--n-head 2] [--val-seq-len 512] [--val-tokens 4096] [--warmup] [--out FILE.json]

PATH is the record's log (or its train_gpt.py with triton_kernels.py beside it), read at run time and never copied
into this repository; speedrun_2026_07_17_record.py loads it, with the CUDA, Triton and FlashAttention parts replaced
by torch definitions (speedrun_2026_07_17_check.py's docstring lists them; the Polar Express products are the port's
torch calls, as in speedrun_2026_07_17_check_optim.py) and torch.compile left out (the port runs eagerly on a CPU),
but for the optimizer's cautious update, which the CPU can only run compiled, as the record does.

The record's side is its main program's step logic, repeated here as its code has it (the main program itself starts
a process group on a GPU): its model built from the seed and cast to bf16 as the main program casts it, its
TrainingManager (NorMuon and Adam, the schedule, the untying), with --warmup the main program's warm-up (a step at
each transition, then the model and the optimizer put back), then for each step: advance_schedule, validation where
due (with the final window extension at the last step), the micro-steps through distributed_data_generator with the
summed loss times grad_scale, step_optimizers, quantize_mlp_fp8. It runs as the record does on one GPU:
grad_accum_steps 8 (its eight sequences accumulated, grad_scale 1/8), with the parameter banks padded for eight ranks
as the port pads them. The schedule is shrunk the same way on both sides: the stages' batches divided by
--batch-divisor (each stage's longest document piece then the port's choice for that sequence length; a sequence
under 300 tokens, which the record's rule gives no room for documents, the port's 128) and the steps
--scheduled-steps + --extension-steps; the record's validation reads the trainer's --val-seq-len windows. FP8 is off
on both sides (the record's DISABLE_FP8): the trainer turns it on only on a GPU with FP8 matmuls (the model check
compares the FP8 paths).

The trainer's side is job.train's Trainer built from the command line `--recipe speedrun --preset tiny`
with the same sizes, run in this process; its per-token losses are read by a hook on the model, its step losses and
validation losses from its metrics.jsonl.

The shards are the bundled text's paragraphs as documents, each after <|endoftext|>, in llm.c's .bin format (which the
record reads), 30,000 tokens each. The default run's 8 steps cross both batch stages (4,096 -> 8,192 -> 12,288
tokens at steps 2 and 4), the long window's changes (3 -> 7 -> 11 -> 13 blocks, with YaRN, and 20 for the last
validation), the cooldown (from step 2), Adam's odd steps, the untying (step 5) and two shard switches.

Prints the largest difference per figure and exits 1 unless all of them are equal, bit for bit. --out writes the
figures, with the record's losses and weight checksums and the CPU that computed them (what
tests/test_speedrun_2026_07_17_trainer.py holds the trainer to).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from job import binshard  # noqa: E402
from job.errors import ArgumentParser, UserError, check_output_path, cli_main, int_arg  # noqa: E402
from job.tokenizer import EOT, encode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedrun_2026_07_17_record import check_record_path, difference, load_record, record_model, report  # noqa: E402

RECIPE = "speedrun"
CORPUS = ROOT / "job" / "assets" / "tinyshakespeare.txt"
SHARD_TOKENS = 30_000  # the default run reads over 74,000 tokens: it crosses two shards
VAL_SHARDS = 2  # the record's validation opens the next shard when fewer tokens than a step are left


def checksum(t: torch.Tensor) -> list[float]:
    """(sum, sum of |x|, sum of x^2) in float64: what a stored figure keeps of a tensor."""
    t = t.detach().double()
    return [t.sum().item(), t.abs().sum().item(), t.square().sum().item()]


# --- the data ------------------------------------------------------------------------------------------------------
def write_shards(d: Path) -> None:
    """The bundled text's paragraphs as documents, <|endoftext|> before each, in .bin shards: the first VAL_SHARDS
    pieces for validation, the rest for training, each SHARD_TOKENS long (the last one shorter)."""
    tokens = np.array([t for doc in CORPUS.read_text().split("\n\n") for t in [EOT, *encode(doc)]], dtype=np.uint16)
    pieces = [tokens[i : i + SHARD_TOKENS] for i in range(0, len(tokens), SHARD_TOKENS)]
    for i, piece in enumerate(pieces[:VAL_SHARDS]):
        binshard.write(d / f"fineweb_val_{i:06d}.bin", piece)
    for i, piece in enumerate(pieces[VAL_SHARDS:]):
        binshard.write(d / f"fineweb_train_{i + 1:06d}.bin", piece)


# --- the trainer's run ---------------------------------------------------------------------------------------------
def trainer_argv(opts: dict, data_dir: Path, log_dir: Path) -> list[str]:
    """The trainer's command line for these sizes (the tiny preset's, narrowed)."""
    seq = 3 * 16384 // opts["batch_divisor"]  # the last stage's sequence
    steps = opts["scheduled_steps"] + opts["extension_steps"]
    return [str(a) for a in [
        "--recipe", RECIPE, "--preset", "tiny", "--n-embd", opts["n_embd"], "--n-head", opts["n_head"],
        "--block-size", opts["block_size"], "--batch-divisor", opts["batch_divisor"],
        "--scheduled-steps", opts["scheduled_steps"], "--extension-steps", opts["extension_steps"], "--max-steps", steps,
        "--seq-len", seq, "--total-batch-tokens", 8 * seq, "--val-seq-len", opts["val_seq_len"], "--val-tokens", opts["val_tokens"],
        "--eval-every", steps, "--checkpoint-every", 0, "--sample-num", 0, "--hellaswag-every", 0, "--compile", "off",
        "--seed", opts["seed"], "--device", "cpu", "--data-dir", data_dir, "--log-dir", log_dir,
    ]]  # fmt: skip


def run_trainer(opts: dict, data_dir: Path, log_dir: Path) -> dict:
    """job.train's Trainer on these sizes in this process: per step the per-token losses of each micro-step (a hook on
    the model), the step's loss as logged; the validation losses by step; the final weights."""
    from job.config import parse_args
    from job.runtime import setup_runtime
    from job.train import Trainer

    cfg = parse_args(trainer_argv(opts, data_dir, log_dir))
    trainer = Trainer(cfg, setup_runtime(cfg))
    gpt = trainer.model.gpt
    tokens: list[torch.Tensor] = []
    gpt.register_forward_hook(lambda module, args, out: tokens.append(out.detach().clone()) if module.training else None)
    trainer.run()
    events = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "train"]
    return {
        "losses": [e["loss"] for e in steps],
        "token_losses": tokens,
        "val": {e["step"]: e["loss"] for e in events if e["event"] == "val"},
        "state": gpt.state_dict(),
    }


# --- the record's run ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def fp8_disabled():
    """The record's DISABLE_FP8, read when its model is built and at each forward."""
    saved = os.environ.get("DISABLE_FP8")
    os.environ["DISABLE_FP8"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["DISABLE_FP8"]
        else:
            os.environ["DISABLE_FP8"] = saved


def shrink(ns: dict, opts: dict) -> None:
    """The record's stages with their batches divided by --batch-divisor, the longest document piece the port's for
    each sequence length, and its schedule on the shrunk steps; its data and validation sizes."""
    from job.recipes.speedrun import doc_len
    from job.speedrun_2026_07_17.bos_loader import max_docs

    stages = [replace(s, batch_size=s.batch_size // opts["batch_divisor"]) for s in ns["TRAINING_STAGES"]]
    stages = [replace(s, train_max_seq_len=doc_len(s.batch_size // 8)) for s in stages]
    ns["TRAINING_STAGES"] = stages
    ns["training_schedule"] = ns["TrainingSchedule"](stages, opts["scheduled_steps"], opts["extension_steps"], cooldown_frac=0.60)
    # Room for a sequence's documents: the record's rule gives none under 300 tokens (its shortest sequence is 16,384),
    # where the port's gives 128; its table takes the port's number for those lengths.
    for tokens in {s.batch_size // 8 for s in stages} | {opts["val_seq_len"]}:
        if tokens < 300:
            ns["TRAIN_MAX_NUM_DOCS"][tokens] = max_docs(tokens)
    args = ns["args"]
    args.bigram_dim = opts["n_embd"] // 4  # the port's (the record's 192 of 768)
    args.val_batch_size = 8 * opts["val_seq_len"]
    args.val_tokens = opts["val_tokens"]


def run_record(ns: dict, opts: dict, data_dir: Path, warmup: bool = True) -> dict:
    """The record's main program's steps (see the docstring), with its process's placement: one GPU of eight
    accumulated micro-steps."""
    shrink(ns, opts)
    args = ns["args"]
    args.train_files, args.val_files = str(data_dir / "fineweb_train_*.bin"), str(data_dir / "fineweb_val_*.bin")
    generator, stages, schedule = ns["distributed_data_generator"], ns["TRAINING_STAGES"], ns["training_schedule"]
    grad_accum_steps, grad_scale = ns["grad_accum_steps"], ns["grad_scale"]
    torch.manual_seed(opts["seed"])
    model = record_model(ns, opts["n_head"], opts["n_embd"] // opts["n_head"], opts["n_embd"], opts["block_size"])
    model.quantize_mlp_fp8(bootstrap_down=True)
    manager = ns["TrainingManager"](model)

    def train_loader():
        return generator(args.train_files, stages[0].batch_size, stages[0].train_max_seq_len, grad_accum_steps=grad_accum_steps)

    if warmup:
        initial = dict(model=_copy(model.state_dict()), optimizer=manager.get_state())
        loader = train_loader()
        val_loader = generator(args.val_files, args.val_batch_size, -1, grad_accum_steps=grad_accum_steps, align_to_bos=False)
        transitions = manager.get_transition_steps()
        for step in sorted({0, 1} | {s + o for s in transitions for o in (-2, -1, 0, 1) if s + o >= 2}):
            manager.advance_schedule(step)
            model.eval()
            with torch.no_grad():
                inputs, targets, cum_seqlens, bigram_inputs, _ = next(val_loader)
                model(inputs, targets, cum_seqlens, bigram_inputs, manager.get_forward_args()).mean()
            model.train()
            for _ in range(grad_accum_steps):
                inputs, targets, cum_seqlens, bigram_inputs, bigram_cpu = loader.send(manager.train_loader_send_args)
                manager.sparse_index_update(step, bigram_cpu)
                loss = model(inputs, targets, cum_seqlens, bigram_inputs, manager.get_forward_args()).sum() * grad_scale
                manager.sparse_index_share(step)
                loss.backward()
            manager.step_optimizers(step)
            model.quantize_mlp_fp8(bootstrap_down=True)
        model.zero_grad(set_to_none=True)
        model.load_state_dict(initial["model"])
        manager.reset(initial["optimizer"])
        model.quantize_mlp_fp8(bootstrap_down=True)
        model.train()

    loader = train_loader()
    losses, token_losses, val = [], [], {}
    for step in range(schedule.total_steps + 1):
        last = step == schedule.total_steps
        manager.advance_schedule(step)
        if last or step % opts["eval_every"] == 0:
            if last:
                manager.apply_final_ws_ext()
            model.eval()
            val_steps = grad_accum_steps * args.val_tokens // args.val_batch_size
            val_loader = generator(args.val_files, args.val_batch_size, -1, grad_accum_steps=grad_accum_steps, align_to_bos=False)
            val_loss = torch.zeros(())  # the trainer's sum starts at a tensor zero; the record's at 0, the same sum
            with torch.no_grad():
                for _ in range(val_steps):
                    inputs, targets, cum_seqlens, bigram_inputs, _ = next(val_loader)
                    val_loss += model(inputs, targets, cum_seqlens, bigram_inputs, manager.get_forward_args()).mean()
            val[step] = (val_loss / val_steps).item()
            model.train()
        if last:
            break
        step_loss = torch.zeros(())  # the trainer's logged loss: the mean of the micro-steps' mean losses
        for _ in range(grad_accum_steps):
            inputs, targets, cum_seqlens, bigram_inputs, bigram_cpu = loader.send(manager.train_loader_send_args)
            manager.sparse_index_update(step, bigram_cpu)
            per_token = model(inputs, targets, cum_seqlens, bigram_inputs, manager.get_forward_args())
            token_losses.append(per_token.detach().clone())
            step_loss += per_token.detach().mean() / grad_accum_steps
            loss = per_token.sum() * grad_scale
            manager.sparse_index_share(step)
            loss.backward()
        manager.step_optimizers(step)
        model.quantize_mlp_fp8(bootstrap_down=(step < 16))
        losses.append(step_loss.item())
        print(f"record: step {step}/{schedule.total_steps} loss {losses[-1]:.6f}", file=sys.stderr, flush=True)
    return {"losses": losses, "token_losses": token_losses, "val": val, "state": model.state_dict()}


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


# --- the comparison ------------------------------------------------------------------------------------------------
def compare(record: dict, ours: dict) -> dict:
    out = {}
    n_steps = len(record["losses"])
    if len(ours["losses"]) != n_steps or len(ours["token_losses"]) != len(record["token_losses"]):
        out["steps"] = {"equal": False, "max_abs": 0.0, "why": f"record {n_steps} steps, trainer {len(ours['losses'])}"}
        return out
    accum = len(record["token_losses"]) // n_steps
    for step in range(n_steps):
        micro = range(step * accum, (step + 1) * accum)
        a = torch.cat([ours["token_losses"][i] for i in micro])
        b = torch.cat([record["token_losses"][i] for i in micro])
        out[f"step {step:2d}/per-token losses"] = difference(a, b)
        out[f"step {step:2d}/loss"] = difference(torch.tensor(ours["losses"][step]), torch.tensor(record["losses"][step]))
    for step, want in record["val"].items():
        got = ours["val"].get(step, float("nan"))
        out[f"val loss at step {step}"] = difference(torch.tensor(got), torch.tensor(want))
    rec_state, our_state = record["state"], ours["state"]
    if set(rec_state) != set(our_state):
        out["final/keys"] = {"equal": False, "max_abs": 0.0, "why": f"{sorted(set(rec_state) ^ set(our_state))}"}
    for name in sorted(set(rec_state) & set(our_state)):
        out[f"final/{name}"] = difference(our_state[name], rec_state[name])
    return out


def figures(opts: dict, record: dict, results: dict) -> dict:
    """What --out keeps: the settings, the machine, the record's step and validation losses and a checksum of each of
    its final tensors, and the comparison."""
    return {
        "record": "KellerJordan/modded-nanogpt records/track_1_short/2026-07-17_FP8DownProjection",
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "settings": opts,
        "losses": record["losses"],
        "val": {str(k): v for k, v in record["val"].items()},
        "weights": {k: checksum(v) for k, v in record["state"].items() if v.is_floating_point()},
        "bit_equal": all(r["equal"] for r in results.values()),
    }


@cli_main
def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", type=Path, required=True, help="the record's log (.txt) or its train_gpt.py")
    p.add_argument("--scheduled-steps", type=int_arg(3, 1380), default=6, help="the three stages' steps (default 6)")
    p.add_argument("--extension-steps", type=int_arg(1, 10), default=2, help="the extension's steps (default 2)")
    p.add_argument("--batch-divisor", type=int, choices=(16, 32, 64, 128, 256), default=32, help="every stage's batch divided by this (default 32)")
    p.add_argument("--n-embd", type=int, choices=(32, 64, 128), default=64, help="the model's width (default 64)")
    p.add_argument("--n-head", type=int, choices=(2, 4), default=2, help="attention heads (default 2)")
    p.add_argument("--val-seq-len", type=int, choices=(128, 256, 512), default=512, help="validation windows (default 512)")
    p.add_argument("--val-tokens", type=int_arg(512, 1 << 16), default=4096, help="validation tokens (default 4096)")
    p.add_argument("--warmup", action="store_true", help="run the main program's warm-up (and reset) first on the record's side")
    p.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    check_record_path(args.record)
    if args.out is not None:
        if args.out.is_dir():
            raise UserError(f"--out {args.out} is a directory: pass the path of a JSON file, e.g. {args.out / 'trainer.json'}")
        check_output_path(args.out, "--out")
    if args.val_tokens % args.val_seq_len:
        raise UserError(f"--val-tokens {args.val_tokens} is not a multiple of --val-seq-len {args.val_seq_len}: round it")
    steps = args.scheduled_steps + args.extension_steps
    longest = max(3 * 16384 // args.batch_divisor, args.val_seq_len)  # the rotary tables' length (the last stage's sequence)
    opts = dict(seed=1337, n_embd=args.n_embd, n_head=args.n_head, block_size=longest, batch_divisor=args.batch_divisor,
                scheduled_steps=args.scheduled_steps, extension_steps=args.extension_steps, val_seq_len=args.val_seq_len,
                val_tokens=args.val_tokens, eval_every=steps, warmup=args.warmup)  # fmt: skip
    ns = load_record(args.record, world=8, grad_accum=8, eager=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir, log_dir = Path(tmp) / "data", Path(tmp) / "log"
        data_dir.mkdir()
        write_shards(data_dir)
        with fp8_disabled():
            record = run_record(ns, opts, data_dir, warmup=opts["warmup"])
        ours = run_trainer(opts, data_dir, log_dir)
    results = compare(record, ours)
    print(report(results))
    if args.out is not None:
        args.out.write_text(json.dumps(figures(opts, record, results), indent=1) + "\n")
    if not all(r["equal"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
