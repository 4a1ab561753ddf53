"""Hold the port of modded-nanogpt's record of 2026-07-17 (job/speedrun_2026_07_17/) to the record's own code: its
optimizer, its schedule and its data loader, run side by side with the port's on the CPU.

    python scripts/speedrun_2026_07_17_check_optim.py --record PATH [--ranks 2 8] [--steps N]

PATH is the record's train_gpt.py, or one of its logs (records/track_1_short/2026-07-17_FP8DownProjection/this_pr/
*.txt, which start with train_gpt.py and triton_kernels.py). The record's code is read from there at run time and
never copied into this repository.

What is compared, each with ==, never a tolerance (the two run the same operations on the same machine):

- schedule: every step 0..1390 of the record's TrainingSchedule, get_muon_momentum and TrainingManager.advance_schedule
  (windows, batch, sequence length, the loader's new arguments, YaRN's rescaling, MTP weights as float32), against
  job.speedrun_2026_07_17.schedule;
- optimizer: N steps (default 28: a short schedule of 24 + 4 steps whose stages, Adam's odd steps, the cooldown and
  the untying at step 17 all happen) of the record's TrainingManager.step_optimizers and of the port's, from the
  same small parameters (every label of the record's model) and the same gradients: every parameter and every
  state tensor after every step. In one process, and with --ranks, in W gloo processes (each rank's own shard and
  state; on 8 ranks the record's sparse exchange of the bigram embedding's rows);
- loader: the record's distributed_data_generator with its 8 ranks against the port's DocLoader on 1, 2, 4 and 8
  ranks (micro-step a of rank r against the record's rank a * W + r): inputs, targets, document boundaries and
  bigram hashes, over synthetic shards with a change of batch and sequence length and two shard switches; and the
  validation generator against ValLoader.

What is replaced in the record's code to run it here (everything else is its own source, executed as is):

- its imports of triton, `kernels` (flash attention) and triton_kernels, its model, and its main program (process
  group, CUDA device) are left out; rank, world_size and grad_accum_steps are this process's, device is the CPU;
- triton_kernels' XXT, XTX, ba_plus_cAA, transpose_add, transpose_copy: the torch definitions below (XXT: X @ X^T
  into out; XTX: X^T @ X; ba_plus_cAA: baddbmm/addmm(A, A, A^T, beta, alpha); transpose_add: dst += src^T;
  transpose_copy: dst = src^T), the same calls as the port's. `--kernels fp32` uses instead float32 products
  rounded once (the Triton kernels' arithmetic, whatever the CPU's bf16 matmul does) and reports how far apart;
- torch.compile is left out (the functions run eagerly), except for NorMuonAndAdam._cautious_wd_and_update_inplace,
  whose uint32 shifts the CPU's eager kernels lack: it stays compiled, by inductor, as in the record;
- pin_memory=True is False and device="cuda" is "cpu" (no GPU);
- gloo has no Work.get_future for a reduce-scatter: the record's reduce_scatter_tensor and all_gather_into_tensor go
  through reduce_scatter_single and all_gather_single, whose handles the record waits on as it waits on futures;
- the loader's shard index: the record indexes a shard's first 6,000,000 tokens at once and the rest in a thread,
  switching when the thread is done; the synthetic shards are shorter, so both indexes are the whole shard.

Prints one line per check and exits with status 1 if anything differs.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from job import binshard  # noqa: E402
from job.errors import ArgumentParser, UserError, cli_main  # noqa: E402
from job.speedrun_2026_07_17 import bos_loader, param_table, polar_express, schedule  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speedrun_2026_07_17_record import RecordDist, load_optimizer, record_source  # noqa: E402

# Small parameters under every label of the record's model, at its dtypes (bf16 where the record converts them).
D, VOCAB, BIGRAM_ROWS = 32, 64, 120
SHAPES = dict(
    qk_bank=(8, 16, D),
    vo_bank=(8, D, D),
    mlp_bank=(4, 2, 4 * D, D),
    scalars=(24,),
    smear_gate=(1, 12),
    skip_gate=(1, 12),
    attn_gate_bank=(10, 6, 12),
    ve_gate_bank=(5, 6, 12),
    lm_head=(D, VOCAB),
    bigram_embed=(BIGRAM_ROWS, 16),
    post_lambdas=(11, 2),
    x0_lambdas=(11,),
    bigram_lambdas=(11,),
    resid_lambdas=(11, 2),
    xsa_alphas=(11, 6),
    value_embeds=(5 * VOCAB, D),
    embed=(VOCAB, D),
    mudd_w1=(2, 8, D),
    mudd_w2=(2, 14, 8),
    mudd_b2=(2, 14),
)
RESHAPE = {"qk_bank": (8, 16, D), "vo_bank": (8, D, D), "mlp_bank": (8, 4 * D, D)}  # the record's: up and down alternate
FLOAT32 = {"scalars", "post_lambdas", "x0_lambdas", "bigram_lambdas", "resid_lambdas", "xsa_alphas"}
MODULES = ("lm_head", "embed", "bigram_embed", "smear_gate", "skip_gate")  # ".weight" of a submodule in the record
SHORT = (24, 4)  # scheduled + extension steps of the optimizer's check
SEED = 2026


# ---- what both are run on -----------------------------------------------------------------------------------------


class Yarn:
    """The model's rotary tables as the TrainingManager drives them: the rescalings it asks for are recorded."""

    def __init__(self):
        self.calls = []

    def reset(self):
        self.calls.clear()

    def apply(self, old_window, new_window):
        self.calls.append((old_window, new_window))


class Model(torch.nn.Module):
    """Parameters under the record's names (submodules' weights where its model has them), labelled as it labels
    them, with its banks' reshape; no forward."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(SEED)
        for label, shape in SHAPES.items():
            dtype = torch.float32 if label in FLOAT32 else torch.bfloat16
            p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.1).to(dtype))
            if label in MODULES:
                setattr(self, label, torch.nn.Module())
                getattr(self, label).weight = p
            else:
                setattr(self, label, p)
        with torch.no_grad():
            self.embed.weight.copy_(self.lm_head.weight.T)  # tied at the start, as the record's model is
        for name, p in self.named_parameters():
            p.label = name.replace(".weight", "")
            if p.label in RESHAPE:
                p.reshape = RESHAPE[p.label]
        self.yarn, self.yarn_paired_head = Yarn(), Yarn()


def gradients(step: int, rank: int) -> tuple[dict, np.ndarray]:
    """One step's gradient for every label on one rank, and the bigram embedding's rows it touches (only those rows
    of its gradient are not zero, as an embedding's)."""
    g = torch.Generator().manual_seed(SEED + 1000 * step + rank)
    grads = {}
    for label, shape in SHAPES.items():
        dtype = torch.float32 if label in FLOAT32 else torch.bfloat16
        grads[label] = (torch.randn(shape, generator=g) * 0.01).to(dtype)
    rows = np.unique(torch.randint(0, BIGRAM_ROWS, (20,), generator=g).numpy()).astype(np.int64)
    touched = torch.zeros(BIGRAM_ROWS, dtype=torch.bool)
    touched[torch.from_numpy(rows)] = True
    grads["bigram_embed"] = grads["bigram_embed"] * touched[:, None]
    return grads, rows


def accumulate(params: dict, grads: dict) -> None:
    """A backward pass: into .grad, added to what is left there (Adam's gradients wait for the odd step)."""
    for label, p in params.items():
        p.grad = grads[label].clone() if p.grad is None else p.grad + grads[label]


# ---- the checks: each returns what differs ------------------------------------------------------------------------


def check_schedule(ns) -> list[str]:
    """Every step of the record's schedule, as its training loop advances it, against the port's at(step)."""
    record, manager = ns["training_schedule"], ns["TrainingManager"](Model())
    port = schedule.TrainingSchedule()
    diffs = []
    if (record.boundaries, record.split_step, manager.get_transition_steps()) != (port.boundaries, port.untie_step, port.transition_steps()):
        diffs.append(f"stages: record {record.boundaries} untie {record.split_step}, port {port.boundaries} untie {port.untie_step}")
    for step in range(record.total_steps + 1):
        manager.model.yarn.calls.clear()
        manager.model.yarn_paired_head.calls.clear()
        manager.advance_schedule(step)
        if step == record.total_steps:
            manager.apply_final_ws_ext()
        s = port.at(step)
        want = dict(
            lr=record.get_lr(step),
            muon_momentum=ns["get_muon_momentum"](step),
            windows=(manager.ws_short, manager.ws_long),
            batch_tokens=manager.batch_size,
            seq_len=manager.train_max_seq_len,
            adam=manager._is_adam_step(step),
            untie=step == manager.split_step,
            long_window_change=(manager.model.yarn.calls or [None])[0],
        )
        got = {k: getattr(s, k) for k in want}
        # The loader is sent new arguments exactly where the port's batch or sequence length changes.
        prev = port.at(step - 1) if step else s
        want["loader_change"] = manager.train_loader_send_args is not None
        got["loader_change"] = (s.batch_tokens, s.seq_len) != (prev.batch_tokens, prev.seq_len)
        if not torch.equal(manager.mtp_weights, torch.tensor(s.mtp_weights, dtype=torch.float32)):
            diffs.append(f"step {step}: mtp weights record {manager.mtp_weights.tolist()} port {list(s.mtp_weights)}")
        diffs += [f"step {step}: {k} record {want[k]!r} port {got[k]!r}" for k in want if want[k] != got[k]]
        if manager.model.yarn.calls != manager.model.yarn_paired_head.calls:
            diffs.append(f"step {step}: the two YaRN tables rescaled differently")
    return diffs


def compare_optimizers(step: int, record_opt, record_params: dict, port, port_params: dict) -> list[str]:
    diffs = []
    for label in SHAPES:
        a, b = record_params[label].detach(), port_params[label].detach()
        if not torch.equal(a, b):
            diffs.append(f"step {step}: {label} weights differ (max |diff| {(a.float() - b.float()).abs().max().item():.3g})")
        for key, want in record_opt.param_states[record_params[label]].items():
            got = port.state[label][key]
            if isinstance(want, torch.Tensor):
                want = want.view(torch.int16) if want.dtype == torch.uint16 else want
                same = torch.equal(want, got)
            else:
                same = want == got
            if not same:
                diffs.append(f"step {step}: {label} state {key} differs")
    if record_opt.split_embed == port.tied:
        diffs.append(f"step {step}: record untied {record_opt.split_embed}, port tied {port.tied}")
    return diffs


@contextlib.contextmanager
def replaced(ns: dict, **values):
    """The record's globals set to `values` for a while (its functions read their module's dict, not a copy)."""
    saved = {k: ns[k] for k in values if k in ns}
    ns.update(values)
    try:
        yield
    finally:
        for k in values:
            ns.pop(k, None)
        ns.update(saved)


def compare_configs(record_opt, record_params: dict, port) -> list[str]:
    """Each label's settings as the two optimizers built them (on 8 ranks: the bigram embedding's sparse rows)."""
    diffs = []
    for label in SHAPES:
        want, got = record_opt.param_cfgs[record_params[label]], port.cfgs[label]
        pairs = dict(
            optim=(want.optim, got.optim),
            comms=(want.comms, got.comms),
            lr_mul=(want.lr_mul, got.lr_mul),
            wd_mul=(want.wd_mul, got.wd_mul),
            initial_lr=(want.initial_lr, got.initial_lr),
            weight_decay=(want.weight_decay, got.weight_decay),
            adam_betas=(want.adam_betas, got.adam_betas),
            eps=(want.eps, got.eps),
            chunk=(want.chunk_size, got.chunk),
            shape=(want.reshape, got.bank_shape),
            beta2=(want.beta2, got.beta2),
            per_matrix_lr_mul=(want.per_matrix_lr_mul, got.per_matrix_lr_mul),
        )
        diffs += [f"{label}: {k} record {a!r} port {b!r}" for k, (a, b) in pairs.items() if a != b]
    return diffs


def check_optimizer(ns, steps: int, world: int = 1) -> list[str]:
    """`steps` steps of the record's TrainingManager and of the port's optimizer on this rank, on a short schedule
    (and a bigram table of BIGRAM_ROWS rows; the record's sparse exchange finds the bigram embedding as `model`'s)."""
    args = copy.copy(ns["args"])
    args.bigram_vocab_size = BIGRAM_ROWS
    record_model = Model()
    short = ns["TrainingSchedule"](ns["TRAINING_STAGES"], *SHORT, cooldown_frac=0.60)
    with replaced(ns, training_schedule=short, args=args, model=record_model):
        return optimizer_steps(ns, record_model, steps, world)


def optimizer_steps(ns, record_model, steps: int, world: int) -> list[str]:
    manager = ns["TrainingManager"](record_model)
    record_params = {p.label: p for p in record_model.parameters()}
    port_params = param_table.labelled(Model())
    port = param_table.record_optimizer(port_params, world, 8 // world)
    port_schedule = schedule.TrainingSchedule(scheduled_steps=SHORT[0], extension_steps=SHORT[1])
    rank = dist.get_rank() if dist.is_initialized() else 0
    diffs = [] if all(torch.equal(record_params[k], port_params[k]) for k in SHAPES) else ["the initial weights differ"]
    diffs += compare_configs(manager.optimizer, record_params, port)
    for step in range(steps):
        grads, rows = gradients(step, rank)
        accumulate(record_params, grads)  # the record's loop: rows before the forward, indexes after it, then the step
        manager.sparse_index_update(step, rows)
        manager.sparse_index_share(step)
        manager.step_optimizers(step)
        settings = port_schedule.at(step)
        accumulate(port_params, grads)
        port.mark_rows("bigram_embed", rows)
        if settings.adam:
            port.begin_row_exchange()
            port.share_row_indexes()
        param_table.train_step(port, settings)
        diffs += compare_optimizers(step, manager.optimizer, record_params, port, port_params)
    return diffs


# Steps of the loader's check: a change of batch and sequence length, as the record's stages change them.
LOADER_STEPS = [(8 * 1024, 256)] * 5 + [(8 * 2048, 512)] * 7
TRAIN_SHARDS, VAL_SHARDS, VAL_BATCH, VAL_STEPS = (60_000, 100_000, 80_000, 200_000), (40_000, 40_000), 8 * 2048, 4


def documents(n_tokens: int, g: np.random.Generator) -> np.ndarray:
    """A shard: documents of 1 to 600 tokens, one in eight of 600 to 3,000 (longer than a sequence), each starting
    with <|endoftext|>."""
    out, n = [], 0
    while n < n_tokens:
        length = int(g.integers(600, 3000) if g.random() < 1 / 8 else g.integers(1, 600))
        doc = g.integers(0, bos_loader.EOT, size=length, dtype=np.uint16)
        doc[0] = bos_loader.EOT
        out.append(doc)
        n += len(doc)
    return np.concatenate(out)[:n_tokens]


def write_shards(d: Path) -> None:
    g = np.random.default_rng(SEED)
    for i, n in enumerate(TRAIN_SHARDS):
        binshard.write(d / f"fineweb_train_{i + 1:06d}.bin", documents(n, g))
    for i, n in enumerate(VAL_SHARDS):
        binshard.write(d / f"fineweb_val_{i:06d}.bin", documents(n, g))


class OneOfEight:
    """torch.distributed as the record's loader asks it who it is: rank r of 8."""

    def __init__(self, rank: int):
        self.rank = rank

    def is_initialized(self):
        return True

    def get_rank(self):
        return self.rank

    def get_world_size(self):
        return 8


def record_batches(ns, d: Path, aligned: bool) -> list[list[tuple]]:
    """Per step, the record's eight ranks' (inputs, targets, document boundaries, bigram hashes)."""
    gens, steps = [], []
    for rank in range(8):
        ns["dist"] = OneOfEight(rank)  # read once, when the generator starts
        if aligned:
            gen = ns["distributed_data_generator"](str(d / "fineweb_train_*.bin"), *LOADER_STEPS[0], grad_accum_steps=1)
        else:
            gen = ns["distributed_data_generator"](str(d / "fineweb_val_*.bin"), VAL_BATCH, -1, grad_accum_steps=1, align_to_bos=False)
        gens.append([next(gen)[:4], gen])
    ns["dist"] = RecordDist()
    for i in range(len(LOADER_STEPS) if aligned else VAL_STEPS):
        if i:
            new = (*LOADER_STEPS[i], 1) if aligned and LOADER_STEPS[i] != LOADER_STEPS[i - 1] else None
            for g in gens:
                g[0] = g[1].send(new)[:4]
        steps.append([g[0] for g in gens])
    return steps


def check_loader(ns, d: Path) -> list[str]:
    diffs = []
    for aligned in (True, False):
        want = record_batches(ns, d, aligned)
        for world in (1, 2, 4, 8):
            if aligned:
                loaders = [bos_loader.DocLoader(d, "train", r, world) for r in range(world)]
                got = [[ld.next_step(*LOADER_STEPS[i]) for ld in loaders] for i in range(len(LOADER_STEPS))]
                shards = {ld.shard for ld in loaders}
            else:
                loaders = [bos_loader.ValLoader(d, VAL_BATCH, r, world) for r in range(world)]
                got = [[ld.next_step() for ld in loaders] for _ in range(VAL_STEPS)]
            for i, step in enumerate(got):
                for r, micro in enumerate(step):
                    for a, b in enumerate(micro):
                        rec = want[i][a * world + r]
                        for name, x, y in zip(
                            ("inputs", "targets", "cum_seqlens", "bigram"), rec, (b.inputs, b.targets, b.cum_seqlens, b.bigram), strict=True
                        ):
                            if x.dtype != y.dtype or not torch.equal(x, y):
                                diffs.append(
                                    f"{'train' if aligned else 'val'} step {i}, {world} ranks, rank {r} micro-step {a}: "
                                    f"{name} differs from the record's rank {a * world + r}"
                                )
        if aligned and shards != {len(TRAIN_SHARDS) - 1}:
            diffs.append(f"the training steps end in shard {shards}, not the last: the check does not cross the shard switches it means to")
    return diffs


def kernel_rounding() -> list[str]:
    """How far the port's Polar Express products (torch matmuls in bf16, float32 sums) are from the float32 products
    rounded once that the record's Triton kernels make: the same sums in another order, so a result can land on the
    other side of a bf16 rounding boundary. Information, not a check: neither order is the right one."""
    g = torch.Generator().manual_seed(SEED)
    X = torch.randn(4, 256, 768, generator=g).bfloat16()
    A = polar_express.xxt(X, torch.empty(4, 256, 256, dtype=torch.bfloat16))
    cases = (
        ("X X^T", A, X.float() @ X.float().mT),
        ("X^T X", polar_express.xtx(X, torch.empty(4, 768, 768, dtype=torch.bfloat16)), X.float().mT @ X.float()),
        ("b A + c A A", polar_express.ba_plus_caa(A, 0.5, -2.5, torch.empty_like(A)), 0.5 * (A.float() @ A.float().mT) - 2.5 * A.float()),
    )
    lines = []
    for name, ours, exact in cases:
        rounded = exact.bfloat16()
        ulp = (rounded.float().abs() * 2.0**-7).clamp_min(2.0**-133)  # bf16 keeps 8 significant bits
        worst = ((ours.float() - rounded.float()).abs() / ulp).max().item()
        lines.append(f"{name}: {(ours != rounded).sum().item()} of {ours.numel()} elements differ, by at most {worst:.2g} bf16 ulp")
    return lines


# ---- running them -------------------------------------------------------------------------------------------------


def ranked(rank: int, world: int, record: str, steps: int, port: int, out: str) -> None:
    """One gloo rank of the optimizer's check; what differs goes to out/rank.txt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        diffs = check_optimizer(load_optimizer(Path(record), rank, world), steps, world)
    finally:
        dist.destroy_process_group()
    Path(out, f"{rank}.txt").write_text("".join(f"{line}\n" for line in diffs))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ranks(record: Path, world: int, steps: int) -> list[str]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.spawn(ranked, args=(world, str(record), steps, free_port(), out), nprocs=world)
        return [f"rank {r}: {line}" for r in range(world) for line in Path(out, f"{r}.txt").read_text().splitlines()]


def report(name: str, diffs: list[str]) -> bool:
    print(f"{name}: {'same' if not diffs else f'{len(diffs)} differences'}", flush=True)
    for line in diffs[:20]:
        print(f"  {line}")
    if len(diffs) > 20:
        print(f"  ... and {len(diffs) - 20} more")
    return not diffs


@cli_main
def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", type=Path, required=True, help="the record's train_gpt.py or one of its .txt logs")
    p.add_argument(
        "--ranks",
        type=int,
        nargs="*",
        default=[],
        choices=(2, 4, 8),
        help="also check the optimizer on this many gloo processes (each rank's shard against the record's)",
    )
    p.add_argument("--steps", type=int, default=sum(SHORT), help="optimizer steps to compare (the short schedule has 28)")
    p.add_argument(
        "--kernels",
        choices=("port", "fp32"),
        default="port",
        help="the record's Triton products as the port's torch calls, or as float32 products rounded once",
    )
    args = p.parse_args(argv)
    if not args.record.is_file():
        raise UserError(f"--record {args.record} does not exist: pass the record's train_gpt.py or one of its .txt logs")
    try:
        source = record_source(args.record)
    except UnicodeDecodeError:
        raise UserError(f"--record {args.record} is not text: pass the record's train_gpt.py or one of its .txt logs") from None
    if "class NorMuonAndAdam" not in source:
        raise UserError(f"--record {args.record} holds no NorMuonAndAdam: pass the 2026-07-17 record's train_gpt.py or log")
    if not 1 <= args.steps <= sum(SHORT):
        raise UserError(f"--steps {args.steps}: the short schedule has {sum(SHORT)} steps; pass 1 to {sum(SHORT)}")
    torch.manual_seed(SEED)
    print("Polar Express products, the port's torch matmuls against float32 products rounded once (information):")
    for line in kernel_rounding():
        print(f"  {line}")
    ns = load_optimizer(args.record, fp32_kernels=args.kernels == "fp32")
    ok = report("schedule, steps 0..1390", check_schedule(ns))
    ok &= report(f"optimizer, one process, {args.steps} steps", check_optimizer(ns, args.steps))
    with tempfile.TemporaryDirectory() as d:
        write_shards(Path(d))
        ok &= report("loader, 1/2/4/8 ranks against the record's 8", check_loader(ns, Path(d)))
    for world in args.ranks:
        ok &= report(f"optimizer, {world} gloo ranks, {args.steps} steps", check_ranks(args.record, world, args.steps))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
