"""Record reference figures from modded-nanogpt's own code, for tests/test_speedrun_2025_05_24.py to hold the port to.

    python scripts/speedrun_reference.py --record PATH --out FILE.json [--force]

An existing FILE.json (tests/data/speedrun_reference.json, say) is replaced only with --force.

PATH is the record's train_gpt.py, or its log (records/track_1_short/2025-05-24_StableTorch/*.txt, which starts with
the script's code; RECORD_LOG below). The record's code is read from there and never copied into this repository; only
the figures it produces are. Another file (another record, an edited copy, any other code) is refused in one line
before anything runs, as are a --out that cannot be written and an existing one without --force.

The record's definitions (model, Muon, FP8 op) run on the CPU with these changes, all of placement, none of
arithmetic: tensors it puts on "cuda" go to the CPU; its one-rank all-gather is a copy (gloo, the CPU's backend, does
not take its 2-D buffer); pinned memory is off (a CPU-only machine has none). One change more: FlexAttention's kernel
is replaced by scaled_dot_product_attention over the element mask that torch itself expands from the record's
BlockMask (BlockMask.to_dense on its full and partial blocks, the record's mask_mod on the partial ones). On the CPU,
FlexAttention has no backward pass; eager FlexAttention applies only the mask_mod and ignores the block lists, which
carry the record's sliding window (only compiled FlexAttention honours them, as in the record's compiled model); and
compiled FlexAttention on the CPU fails on the record's call in this torch. The port's own FlexAttention path is
checked against the same dense mask, compiled, in tests/test_speedrun_2025_05_24.py.

The figures, at a small size (12 layers, width 128, one 128-wide head, sequences of 1024 tokens with documents):
the initial weights for a seed; then, from those weights plus seeded noise (see perturb), forward losses for several
windows, four training steps of the record's optimizers
and schedules (loss, and the weights after each step), and the FP8 matmul's output and gradients.

The figures carry the kernels of the CPU that computed them: ATen's vectorised kernels (ATEN_CPU_CAPABILITY:
default, avx2, avx512 on x86), the BLAS's own choice of kernel for the CPU model, and the thread count all change
how float32 sums are rounded. The file records them (cpu_capability, cpu, threads, torch), and the tests compare
with tolerances derived there, never with ==.
"""

from __future__ import annotations

import ast
import hashlib
import json
import platform
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from job.errors import ArgumentParser, UserError, check_output_path, cli_main  # noqa: E402

SEED, VOCAB, DIM, HEADS, SEQ = 1234, 50257, 128, 1, 1024
WINDOWS = (1, 2, 3, 5, 8)
STEPS, ITERATIONS = 4, 6  # four steps of a six-step schedule: constant, then into the cooldown

# The record's log at the modded-nanogpt commit it was read at: the script's code, then its output.
RECORD_LOG = ("https://raw.githubusercontent.com/KellerJordan/modded-nanogpt/f411b3d346aa52d3504324ca93c230fd84c6c07f/"
              "records/track_1_short/2025-05-24_StableTorch/89d9f224-3b01-4581-966e-358d692335e0.txt")
GET_RECORD = f"pass the record's log (`curl -LO {RECORD_LOG}`) or the train_gpt.py it starts with"
# The record's code (the log's first part), as code_digest reads it: another record's, or an edited copy, is not it.
RECORD_DIGEST = "44240c31e02d8be9a392aa31c97c8f6ad9f0d81c51d881d516dc193c8933a6f6"
MAIN = "# int main"  # the record's line between its definitions and its main program
# What these scripts take from the record: its classes with the arguments they are called with, the functions of its
# schedule, and its FP8 matmul op.
RECORD_CLASSES = {"GPT": ("vocab_size", "num_layers", "num_heads", "model_dim", "max_seq_len"), "Muon": ("lr", "momentum", "rank", "world_size")}
RECORD_SCHEDULE = ("get_lr", "get_window_size_blocks")
RECORD_OP = "nanogpt::mm"


def record_source(path: Path) -> str:
    text = path.read_text()
    if text.lstrip().startswith("import os") and "=" * 100 in text:  # a log: the code, then a line of '='
        text = text.split("=" * 100)[0]
    return text


def definitions(source: str) -> str:
    """The record's definitions (everything before its main program), placed on the CPU."""
    head = source.split(MAIN)[0]
    head = head.replace('torch.empty(1, device="cuda", requires_grad=True).backward()', "")
    return head.replace('device="cuda"', 'device="cpu"')


def schedule_functions(source: str) -> str:
    """The record's get_lr and window-size functions, from its main program, placed on the CPU."""
    main = source.split(MAIN)[1]
    start = main.index("# learning rate schedule")
    end = main.index("model: nn.Module = torch.compile")
    return main[start:end].replace("pin_memory=True", "pin_memory=False").replace(".cuda(non_blocking=True)", "")


def code_digest(source: str) -> str:
    """sha256 of the code with trailing spaces and blank lines at either end left out: the same for the log's first
    part and a train_gpt.py cut from it by hand."""
    return hashlib.sha256("\n".join(line.rstrip() for line in source.strip().splitlines()).encode()).hexdigest()


def not_the_record(source: str) -> str | None:
    """Why `source` is not the record's code, in a few words, or None when it is. Read with ast, never run: another
    file fails here, not as a traceback from deep in its own code; what it lacks of what these scripts take from the
    record is named, and code that has all of it but is not the record's is said to be another version."""
    if code_digest(source) == RECORD_DIGEST:
        return None
    if not source.strip():
        return "it is empty"
    if MAIN not in source:
        return f"it has no `{MAIN}` line between the model's code and the training loop"
    try:
        tree = ast.parse(definitions(source))
    except SyntaxError as e:
        return f"line {e.lineno} is not Python: {e.msg}"
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for name, wanted in RECORD_CLASSES.items():
        body = classes[name].body if name in classes else []
        init = next((f for f in body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
        if init is None:
            return f"it defines no class {name}"
        args = {a.arg for a in init.args.args + init.args.kwonlyargs}
        if missing := [a for a in wanted if a not in args]:
            return f"its {name} takes no {', '.join(missing)}"
    if not any(isinstance(n, ast.Constant) and n.value == RECORD_OP for n in ast.walk(tree)):
        return f"it registers no {RECORD_OP} op (the FP8 matmul)"
    try:
        schedule = ast.parse(schedule_functions(source))
    except ValueError:
        return "its training loop has no learning rate schedule before `model: nn.Module = torch.compile`"
    except SyntaxError as e:
        return f"its learning rate schedule is not Python: {e.msg}"
    functions = {n.name for n in schedule.body if isinstance(n, ast.FunctionDef)}
    if missing := [f for f in RECORD_SCHEDULE if f not in functions]:
        return f"its schedule defines no {', '.join(missing)}"
    return "it is another version of the record's code: another record, or an edited copy"


def check_record_path(path: Path) -> None:
    """--record names a file (a directory or a missing path is one line, with where to get the record)."""
    if path.is_dir():
        raise UserError(f"--record {path} is a directory: {GET_RECORD}")
    if not path.is_file():
        raise UserError(f"--record {path} does not exist: {GET_RECORD}")


def read_record(path: Path) -> str:
    """The record's code from its train_gpt.py or its log, or one line saying that the file is not it and where the
    record is."""
    check_record_path(path)
    try:
        source = record_source(path)
    except UnicodeDecodeError:
        source, why = None, "it is not text"
    else:
        why = not_the_record(source)
    if why:
        raise UserError(f"--record {path} is not the record's train_gpt.py or log ({why}): {GET_RECORD}")
    return source


def check_out_file(out: Path, example: str = "speedrun_reference.json") -> None:
    """--out names a file that can be written, refused now rather than after the run."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: pass the path of a JSON file, e.g. {out / example}")
    check_output_path(out, "--out")


class OneRank:
    """torch.distributed as the record's Muon uses it, for a single process: the all-gather is a copy."""

    def __getattr__(self, name):
        return getattr(torch.distributed, name)

    @staticmethod
    def all_gather_into_tensor(out, inp, async_op=False):
        out.view(-1).copy_(inp.view(-1))
        return types.SimpleNamespace(wait=lambda: None)


def dense_flex(q, k, v, block_mask, scale):
    """FlexAttention's result for block_mask, by scaled_dot_product_attention over the element mask torch expands."""
    from torch.nn.attention.flex_attention import BlockMask

    T = q.size(-2)
    partial = BlockMask.from_kv_blocks(block_mask.kv_num_blocks, block_mask.kv_indices, BLOCK_SIZE=128).to_dense()
    full = BlockMask.from_kv_blocks(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, BLOCK_SIZE=128).to_dense()
    expand = lambda m: m[0, 0].bool().repeat_interleave(128, 0).repeat_interleave(128, 1)[:T, :T]  # noqa: E731
    pos = torch.arange(T)
    per_token = block_mask.mask_mod(0, 0, pos[:, None], pos[None, :])
    mask = expand(full) | (expand(partial) & per_token)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def load_record(path: Path) -> dict:
    source = read_record(path)
    ns: dict = {"__name__": "record"}
    exec(compile(definitions(source), str(path), "exec"), ns)  # noqa: S102 - the record's code, fetched by the user
    ns["dist"] = OneRank()
    ns["args"] = types.SimpleNamespace(num_iterations=ITERATIONS, cooldown_frac=0.4)
    exec(compile(schedule_functions(source), str(path), "exec"), ns)  # noqa: S102
    return ns


def batch(step: int) -> torch.Tensor:
    """SEQ + 1 tokens: random GPT-2 ids with <|endoftext|> starting documents of varied length."""
    g = torch.Generator().manual_seed(SEED + 100 + step)
    tokens = torch.randint(0, 50256, (SEQ + 1,), generator=g)
    starts = torch.randint(0, SEQ, (6,), generator=g)
    tokens[starts] = 50256
    tokens[0] = 50256
    return tokens


def checksum(t: torch.Tensor) -> list[float]:
    t = t.detach().double()
    return [t.sum().item(), t.abs().sum().item(), t.square().sum().item()]


def weights(model) -> dict:
    return {n: checksum(p) for n, p in model.named_parameters()}


def build(ns):
    torch.manual_seed(SEED)
    return ns["GPT"](vocab_size=VOCAB, num_layers=12, num_heads=HEADS, model_dim=DIM, max_seq_len=SEQ)


def perturb(model) -> None:
    """Seeded noise on every weight, by name: the zero-initialised output layer and projections would otherwise
    hide every other part of the model from a loss (all logits equal) and from the first step's gradients."""
    g = torch.Generator().manual_seed(SEED + 1)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            std = 1.0 if name == "lm_head.weight" else 0.3 if p.ndim < 2 else 0.05 if "c_proj" in name else 0.02
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def forward_losses(ns) -> dict:
    ns["flex_attention"] = dense_flex
    model = build(ns)
    perturb(model)
    model.eval()
    out = {}
    with torch.no_grad():
        for step in range(2):
            tokens = batch(step)
            for w in WINDOWS:
                loss = model(tokens[:-1].int(), tokens[1:], torch.tensor(w, dtype=torch.int32))
                out[f"{step}/{w}"] = loss.item()
    return out


def record_optimizers(ns, model) -> tuple:
    """(Adam, Muon) as the record's main program builds them, for one rank, with its initial_lr bookkeeping."""
    hidden = [p for n, p in model.blocks.named_parameters() if p.ndim >= 2 and "embed" not in n]
    embed = [p for n, p in model.named_parameters() if "embed" in n]
    scalars = [p for p in model.parameters() if p.ndim < 2]
    adam = torch.optim.Adam([dict(params=[model.lm_head.weight], lr=0.22), dict(params=embed, lr=0.6),
                             dict(params=scalars, lr=0.04)], betas=(0.8, 0.95), eps=1e-10, fused=True)
    muon = ns["Muon"](hidden, lr=0.05, momentum=0.95, rank=0, world_size=1)
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return adam, muon


def training(ns) -> dict:
    model = build(ns)
    perturb(model)
    model.lm_head.use_fp8 = False  # the port's FP8 needs an FP8 GPU; the op itself is compared separately
    ns["flex_attention"] = dense_flex
    adam, muon = record_optimizers(ns, model)
    optimizers = [adam, muon]
    steps = []
    for step in range(STEPS):
        tokens = batch(10 + step)
        loss = model(tokens[:-1].int(), tokens[1:], ns["get_window_size_blocks"](step))
        loss.backward()
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * ns["get_lr"](step)
        for group in muon.param_groups:
            frac = min(step / 300, 1)
            group["momentum"] = (1 - frac) * 0.85 + frac * 0.95
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        steps.append({"loss": loss.item(), "window_blocks": int(ns["get_window_size_blocks"](step)),
                      "lr_factor": ns["get_lr"](step), "weights": weights(model)})
    return {"steps": steps}


def fp8_op(ns) -> dict:
    g = torch.Generator().manual_seed(SEED + 7)
    x = torch.randn(256, DIM, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(512, DIM, generator=g) * 0.05).requires_grad_()
    scales = (DIM ** 0.5 / 448, 24 / 448, 1 / 448)
    out = torch.ops.nanogpt.mm(x, w, *scales)[0]
    grad = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(grad)
    return {"out": checksum(out), "grad_x": checksum(x.grad), "grad_w": checksum(w.grad)}


def cpu_model() -> str:
    """The CPU's model name (what the BLAS picks its kernels by), or the architecture where the OS does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cli_main
def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", type=Path, required=True, help="the record's train_gpt.py or its log")
    p.add_argument("--out", type=Path, required=True,
                   help="the JSON to write (the tests read tests/data/speedrun_reference.json)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    # Everything that can be refused is refused before the minutes of the run: the output first, before the record is read.
    check_record_path(args.record)
    check_out_file(args.out)
    if args.out.exists() and not args.force:
        raise UserError(f"--out {args.out} exists: pass --force to replace it, or write to another file and compare")
    ns = load_record(args.record)
    figures = {
        "record": "KellerJordan/modded-nanogpt records/track_1_short/2025-05-24_StableTorch",
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "size": dict(seed=SEED, vocab_size=VOCAB, n_layer=12, n_head=HEADS, n_embd=DIM, seq_len=SEQ,
                     windows=WINDOWS, steps=STEPS, iterations=ITERATIONS),
        "init": weights(build(ns)),
        "forward_losses": forward_losses(ns),
        "training": training(ns),
        "fp8": fp8_op(ns),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
