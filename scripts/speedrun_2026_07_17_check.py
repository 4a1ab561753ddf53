"""The 2026-07-17 record's model against job/speedrun_2026_07_17's, in one process on the CPU: the same initial
weights from a seed, then, from the same perturbed weights and batch, the forward losses and every gradient.

    python scripts/speedrun_2026_07_17_check.py --record PATH [--size small|full] [--seq-len N] [--out FILE.json]

PATH is the record's log (records/track_1_short/2026-07-17_FP8DownProjection/this_pr/*.txt, which starts with its
train_gpt.py and triton_kernels.py) or its train_gpt.py with triton_kernels.py beside it. The record's code is read
from there at run time and never copied into this repository.

It runs on a CPU, so the parts of the record that need CUDA, Triton or a downloaded kernel are replaced by torch
definitions of the same arithmetic, each written here from the record's kernel source (not taken from the port):

- triton_kernels.linear_relu_square (the MLP's Triton kernel: bf16 or FP8 up projection, ReLU², the e4m3 copy of
  the activations and their amax; and its backward), reduce_mlp_activation_scales, quantize_transpose_mlp_down_weights
  and transpose_copy: torch functions of the same roundings (the partial amaxes go to the first slot of each layer's
  row, the others 0, which the reduction's max does not see);
- the CUDA C kernel ce_fwd_bwd_kernel (the soft-capped multi-token cross-entropy and its gradient): the same
  per-row arithmetic in float32 (the kernel's fast-math tanh, exp and log are the exact ones here);
- torch._scaled_mm: the FP8 values dequantised to float32 and multiplied there, then scaled (torch's CPU _scaled_mm
  is a reference loop, far too slow); the port does the same on a CPU;
- FlashAttention-3's flash_attn_varlen_func (a downloaded CUDA kernel): scaled_dot_product_attention over a mask
  built per document here, causal with window_size[0] keys back;
- the key shift of the long-window layers, `k[:, 1:, ..] = k[:, :-1, ..]`: its right side is cloned first. The record
  runs it compiled, which reads the old keys (a shift by one); eager torch copies row by row over the overlap and
  would smear the first row down the sequence;
- FusedSoftcappedCrossEntropy.backward returns 7 gradients for its 8 inputs, which the compiled record accepts and
  eager autograd refuses: an eighth None is added (grad_scale's);
- placement: the CPU for its CUDA device, one process standing for the record's 8 ranks (world_size 8 sizes its
  parameter banks; grad_accum_steps 1), 132 for the GPU's SM count (a scratch buffer's size);
- the main program is not run: the check repeats its dtype casts (bf16 embeddings, linears and banks) and its
  quantize_mlp_fp8(bootstrap_down=True) after building the model.

Both models are built at the same size (small by default: 4 heads of 32, width 128, bigram embedding 64 wide;
--size full is the record's 6 x 128) with the record's vocabulary, and must come out of the same seed with the
same weights. Seeded noise is then added to every weight (zero-initialised ones would hide parts of the model), the
same weights are loaded into both, and on one batch of documents the check compares: the training forward (FP8 MLPs,
FP8 output layer, three multi-token weights) and every gradient of the summed loss; the same without FP8 MLPs;
evaluation's losses; the FP8 scales after two quantize_mlp_fp8 calls and a forward; a forward after a YaRN window
change. It prints each figure's largest difference and whether the two are bit for bit equal, exits 1 if any is not.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from job.errors import ArgumentParser, UserError, check_output_path, cli_main, int_arg  # noqa: E402
from job.speedrun_2026_07_17 import bos_loader, transformer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedrun_2026_07_17_record import RECORD_LOG, check_record_path, difference, load_record, record_model, report  # noqa: E402, F401  (RECORD_LOG: the tests read it)

SEED = 1234
SIZES = {
    "small": dict(num_heads=4, head_dim=32, model_dim=128, bigram_vocab_size=50304, bigram_dim=64),
    "full": dict(num_heads=6, head_dim=128, model_dim=768, bigram_vocab_size=50304 * 15, bigram_dim=192),
}
BLOCK = 128  # the record's windows come in 128-token blocks


def check_out_file(out: Path) -> None:
    """--out names a file that can be written, refused now rather than after the run."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: pass the path of a JSON file, e.g. {out / 'speedrun_2026_07_17_check.json'}")
    check_output_path(out, "--out")


# --- the two models ----------------------------------------------------------------------------------------------
def build_record(ns: dict, size: dict, seq_len: int):
    args = ns["args"]
    args.bigram_vocab_size, args.bigram_dim = size["bigram_vocab_size"], size["bigram_dim"]
    torch.manual_seed(SEED)
    return record_model(ns, size["num_heads"], size["head_dim"], size["model_dim"], seq_len)


def build_port(size: dict, seq_len: int):
    torch.manual_seed(SEED)
    return transformer.GPT(transformer.GPTConfig(max_seq_len=seq_len, **size))


def perturb(model) -> None:
    """Seeded noise on every weight, by name, in each weight's dtype."""
    g = torch.Generator().manual_seed(SEED + 1)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            std = 0.3 if p.ndim < 2 else 0.05 if name in ("lm_head.weight", "embed.weight") else 0.02
            p.add_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def batch(seq_len: int, ns: dict, bigram_vocab_size: int):
    """One packed sequence: random GPT-2 ids, documents starting at <|endoftext|>, and what the loader makes of it."""
    g = torch.Generator().manual_seed(SEED + 2)
    tokens = torch.randint(0, 50256, (seq_len + 1,), generator=g)
    starts = torch.randint(1, seq_len, (max(1, seq_len // 300),), generator=g)
    tokens[starts] = 50256
    tokens[0] = 50256
    inputs, targets = tokens[:-1].to(torch.int32), tokens[1:].to(torch.int64)
    bos = torch.nonzero(inputs == 50256)[:, 0]
    seqlens = torch.full((len(bos) + 4,), seq_len, dtype=torch.int32)
    seqlens[: len(bos)] = bos
    bigram = bos_loader.bigram_hash(inputs, bigram_vocab_size)
    assert torch.equal(bigram, ns["get_bigram_hash"](inputs).to(torch.int32))
    return inputs, targets, seqlens, bigram


# --- the comparisons -----------------------------------------------------------------------------------------------
def state_differences(record, port) -> dict:
    ours = port.state_dict()
    out = {f"init/{k}": difference(ours[k], v) for k, v in record.state_dict().items()}
    out["init/keys"] = {"equal": set(ours) == set(record.state_dict()), "max_abs": 0.0}
    rec_params, our_params = dict(record.named_parameters()), dict(port.named_parameters())
    same_tags = all(
        rec_params[n].label == our_params[n].label and rec_params[n].__dict__.get("reshape") == our_params[n].__dict__.get("reshape")
        for n in rec_params
    )
    out["init/labels and optimizer shapes"] = {"equal": same_tags, "max_abs": 0.0}
    return out


def train_step(model, data, schedule) -> tuple[torch.Tensor, dict]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(*data, schedule)
    loss.sum().backward()  # the record's loss: the sum times grad_scale, 1 for its 8 ranks
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def compare_training(rec, ours, data, schedules, tag: str) -> dict:
    out = {}
    rec_loss, rec_grads = train_step(rec, data, schedules[0])
    our_loss, our_grads = train_step(ours, data, schedules[1])
    out[f"{tag}/loss"] = difference(our_loss, rec_loss)
    for name, g in rec_grads.items():
        if g is None or our_grads[name] is None:
            out[f"{tag}/grad/{name}"] = {"equal": g is None and our_grads[name] is None, "max_abs": 0.0, "why": "no gradient"}
        else:
            out[f"{tag}/grad/{name}"] = difference(our_grads[name], g)
    out[f"{tag}/mlp activation scales"] = difference(ours._mlp_down_act_scales, rec._mlp_down_act_scales)
    return out


def compare_eval(rec, ours, data, schedules, tag: str) -> dict:
    rec.eval()
    ours.eval()
    with torch.no_grad():
        return {f"{tag}/loss": difference(ours(*data, schedules[1]), rec(*data, schedules[0]))}


def compare_quantization(rec, ours) -> dict:
    out = {}
    for name in ("_mlp_down_proj_scales", "_mlp_down_proj_next_scales", "_mlp_up_proj_scales"):
        out[f"quantize/{name}"] = difference(getattr(ours, name), getattr(rec, name))
    for name in ("_mlp_up_proj_f8", "_mlp_down_proj_f8"):
        out[f"quantize/{name}"] = difference(getattr(ours, name).float(), getattr(rec, name).float())
    return out


def schedules(ns, mtp: list[float], ws_short: int, ws_long: int, seq_len: int):
    weights = torch.tensor(mtp)
    return (
        ns["ForwardScheduleConfig"](mtp_weights=weights, ws_short=ws_short, ws_long=ws_long, train_max_seq_len=seq_len),
        transformer.ForwardSchedule(mtp_weights=weights, ws_short=ws_short, ws_long=ws_long, train_max_seq_len=seq_len),
    )


def run_checks(ns: dict, size: dict, seq_len: int) -> dict:
    rec, ours = build_record(ns, size, seq_len), build_port(size, seq_len)
    results = state_differences(rec, ours)
    perturb(rec)
    ours.load_state_dict(rec.state_dict())
    for m in (rec, ours):
        m.quantize_mlp_fp8(bootstrap_down=True)
    results.update(compare_quantization(rec, ours))
    data = batch(seq_len, ns, size["bigram_vocab_size"])
    short, long = BLOCK, 3 * BLOCK
    sched = schedules(ns, [1.0, 0.5, 0.25], short, long, seq_len)
    results.update(compare_training(rec, ours, data, sched, "train fp8"))
    os.environ["DISABLE_FP8"] = "1"
    ours.config.fp8 = False
    try:
        results.update(compare_training(rec, ours, data, schedules(ns, [1.0, 0.5], short, long, seq_len), "train bf16"))
    finally:
        del os.environ["DISABLE_FP8"]
        ours.config.fp8 = True
    results.update(compare_eval(rec, ours, data, sched, "eval"))
    # An optimizer step's change to the MLPs, then the delayed scales: the next quantisation uses the last one's amax.
    g = torch.Generator().manual_seed(SEED + 3)
    noise = (torch.randn(rec.mlp_bank.shape, generator=g) * 0.01).to(torch.bfloat16)
    for m in (rec, ours):
        with torch.no_grad():
            m.mlp_bank.add_(noise)
        m.quantize_mlp_fp8(bootstrap_down=False)
    results.update({k.replace("quantize/", "requantize/"): v for k, v in compare_quantization(rec, ours).items()})
    results.update(compare_training(rec, ours, data, sched, "train fp8 after requantize"))
    # The long window grows from 3 to 7 blocks: YaRN on both rotary tables.
    rec.yarn.apply(long, 7 * BLOCK)
    rec.yarn_paired_head.apply(long, 7 * BLOCK)
    ours.rescale_rotary(long, 7 * BLOCK)
    for name in ("yarn", "yarn_paired_head"):
        for table in ("factor1", "factor2"):
            results[f"yarn/{name}.{table}"] = difference(getattr(getattr(ours, name), table), getattr(getattr(rec, name), table))
        same = getattr(ours, name).attn_scale == getattr(rec, name).attn_scale
        results[f"yarn/{name}.attn_scale"] = {"equal": same, "max_abs": abs(getattr(ours, name).attn_scale - getattr(rec, name).attn_scale)}
    results.update(compare_eval(rec, ours, data, schedules(ns, [1.0], 3 * BLOCK, 7 * BLOCK, seq_len), "eval after yarn"))
    return results


@cli_main
def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", type=Path, required=True, help="the record's log (.txt) or its train_gpt.py")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="model size (default small)")
    p.add_argument("--seq-len", type=int_arg(BLOCK, 1 << 16), default=512, help="tokens in the batch (default 512)")
    p.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    # Everything that can be refused is refused before the minutes of the run.
    check_record_path(args.record)
    if args.out is not None:
        check_out_file(args.out)
    ns = load_record(args.record)
    results = run_checks(ns, SIZES[args.size], args.seq_len)
    print(report(results))
    if args.out is not None:
        args.out.write_text(json.dumps({"size": args.size, "seq_len": args.seq_len, "torch": torch.__version__, "results": results}, indent=1) + "\n")
    if not all(r["equal"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
