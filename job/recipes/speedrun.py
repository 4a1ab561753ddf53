"""The NanoGPT speedrun's record of 2026-07-17 (modded-nanogpt, track 1, "MLP down projection in FP8"): 1380 steps in
three stages that grow the batch and the sequence and drop the multi-token-prediction losses, then 10 steps of
extension, on BOS-aligned sequences, with NorMuon and Adam. Its parts are in job/speedrun_2026_07_17/; this card wires
them into the trainer's loop (through wiring.py's adapters).

The presets: `gpt2` is the record's size and stage table; `tiny` the same layer layout 64 wide, every stage's batch
divided by --batch-divisor (512: sequences of 32, 64 and 96 tokens) and the steps cut to --scheduled-steps (9 + 3),
for a CPU on the bundled corpus (`make demo RECIPE=speedrun`). Each step is the record's eight sequences: on fewer ranks the trainer accumulates them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from job import contract
from job.errors import UserError
from job.recipes import Published, Recipe, StepLayout, hparam

LAYERS, RECORD_RANKS, BLOCK = 11, 8, 128  # the record's (transformer.LAYERS, schedule.RECORD_RANKS, schedule.BLOCK)
RECORD_STEPS, RECORD_EXTENSION = 1380, 10
RECORD_SECONDS = 79.7  # published: 79.7 s on 8xH100 for the 1390 steps
VAL_SEQ, VAL_TOKENS = 4 * 64 * 1024, 10_485_760
# The record's longest document piece by sequence length (its stages' seq_len); other lengths take the longest.
DOC_LEN = {16384: 896, 32768: 2048, 49152: 2048}


def doc_len(seq_tokens: int) -> int:
    return DOC_LEN.get(seq_tokens, max(DOC_LEN.values()))


@dataclass
class Hparams:
    scheduled_steps: int = hparam(RECORD_STEPS, "the steps of the three stages (the record's 1380)...")
    extension_steps: int = hparam(RECORD_EXTENSION, "...then this many of the extension; --max-steps is their sum")
    batch_divisor: int = hparam(1, "every stage's tokens per step divided by this (1: the record's batches)")


PRESETS = {
    "gpt2": dict(
        n_layer=LAYERS, n_head=6, n_embd=768, block_size=VAL_SEQ, vocab_size=50257,
        micro_batch=1, seq_len=49152, total_batch_tokens=RECORD_RANKS * 49152, max_steps=RECORD_STEPS + RECORD_EXTENSION,
        val_seq_len=VAL_SEQ, val_tokens=VAL_TOKENS, eval_every=250, hellaswag_every=0, sample_every=0,
        checkpoint_every=500, keep_every=0,
        data_dir=os.path.join(contract.PERSISTENT, contract.HUB_SHARDS["fineweb-gpt2"].subdir),
    ),
    "tiny": dict(
        n_layer=LAYERS, n_head=2, n_embd=64, block_size=512, vocab_size=50257,
        micro_batch=1, seq_len=96, total_batch_tokens=RECORD_RANKS * 96, max_steps=12,
        val_seq_len=128, val_tokens=2048, eval_every=6, hellaswag_every=0, sample_every=0,
        checkpoint_every=6, keep_every=0, compile="off", data_dir="data/tinyshakespeare",
        scheduled_steps=9, extension_steps=3, batch_divisor=512,
    ),
}


def stages(hp):
    """The record's stage table with each stage's batch divided by --batch-divisor."""
    from dataclasses import replace

    from job.speedrun_2026_07_17.schedule import STAGES

    return tuple(replace(s, batch_tokens=s.batch_tokens // hp.batch_divisor) for s in STAGES)


def training_schedule(hp):
    from job.speedrun_2026_07_17.schedule import TrainingSchedule

    return TrainingSchedule(stages(hp), scheduled_steps=hp.scheduled_steps, extension_steps=hp.extension_steps)


class Speedrun(Recipe):
    name = "speedrun"
    summary = ("modded-nanogpt's speedrun record of 2026-07-17: 1380 + 10 steps of staged batches, multi-token losses, "
               "BOS-aligned sequences, NorMuon, FP8 MLPs and output layer")
    Hparams = Hparams
    presets = PRESETS
    data = "fineweb-gpt2"
    bundled_presets = ("tiny",)
    published = Published(RECORD_SECONDS / (RECORD_STEPS + RECORD_EXTENSION), "gpu_8x_h100_sxm5",
                          f"modded-nanogpt's published record ({RECORD_SECONDS} s for {RECORD_STEPS + RECORD_EXTENSION} steps on 8xH100)")
    autocast = False  # the model keeps the record's precision itself (bf16 matrices, float32 lambdas, FP8 matmuls)
    reduces_gradients = True  # NorMuonAndAdam reduce-scatters and all-reduces them, as the record's does

    def check(self, cfg, world_size):
        hp = cfg.hp
        if cfg.n_layer != LAYERS:
            raise UserError(f"--n-layer {cfg.n_layer}: the record's layer layout is {LAYERS} layers: leave --n-layer out")
        if cfg.n_embd % cfg.n_head or cfg.n_head % 2:
            raise UserError(f"--n-head {cfg.n_head} must be even and divide --n-embd {cfg.n_embd} (the record pairs its heads)")
        if world_size < 1 or RECORD_RANKS % world_size:
            raise UserError(f"{world_size} ranks: the record's step is {RECORD_RANKS} sequences, so run on 1, 2, 4 or 8 ranks")
        if cfg.micro_batch != 1:
            raise UserError(f"--micro-batch {cfg.micro_batch}: the record reads one sequence per micro-batch: use --micro-batch 1")
        if hp.scheduled_steps < 3 or hp.extension_steps < 1:
            raise UserError(f"--scheduled-steps {hp.scheduled_steps} / --extension-steps {hp.extension_steps}: the three "
                            "stages need at least 3 steps and the extension at least 1")
        if cfg.max_steps != hp.scheduled_steps + hp.extension_steps:
            fit = cfg.max_steps - hp.extension_steps
            shorter = f", or --scheduled-steps {fit} to fit the stages into {cfg.max_steps} steps" if fit >= 3 else ""
            raise UserError(f"--max-steps {cfg.max_steps} is not --scheduled-steps {hp.scheduled_steps} + --extension-steps "
                            f"{hp.extension_steps}: use --max-steps {hp.scheduled_steps + hp.extension_steps}{shorter}")
        smallest = 16384 * RECORD_RANKS
        if hp.batch_divisor < 1 or smallest % (hp.batch_divisor * RECORD_RANKS):
            raise UserError(f"--batch-divisor {hp.batch_divisor} must divide {smallest // RECORD_RANKS} (the first stage's "
                            "sequence), e.g. 1, 16 or 64")
        val = cfg.val_seq_len or cfg.seq_len
        if val > cfg.block_size:
            raise UserError(f"--val-seq-len {val} is longer than --block-size {cfg.block_size}: raise --block-size")

    def staged(self, cfg):
        return True

    def step_layout(self, step, cfg):
        from job.speedrun_2026_07_17.schedule import STAGES

        hp = cfg.hp
        boundaries = _boundaries(hp, len(STAGES))
        stage = next((i for i, end in enumerate(boundaries) if step < end), len(STAGES) - 1)
        tokens = STAGES[stage].batch_tokens // hp.batch_divisor
        return StepLayout(1, tokens // RECORD_RANKS, tokens)

    def divergence_advice(self, cfg):
        return "the record's settings (it has no learning-rate flag: its rates are the record's)"

    def build_model(self, cfg, device, compute_dtype):
        import torch

        from job.speedrun_2026_07_17.kernels import fp8_matmul_supported
        from job.speedrun_2026_07_17.normuon import rank_and_world
        from job.speedrun_2026_07_17.transformer import GPT
        from job.speedrun_2026_07_17.wiring import RecordModel

        # The summed loss the trainer backpropagates is the record's times ranks / 8 (it accumulates the eight
        # sequences): the output layer's FP8 gradient scale follows it.
        world = rank_and_world()[1]
        fp8 = compute_dtype == torch.bfloat16 and fp8_matmul_supported(device)
        gpt = GPT(self._gpt_config(_model_fields(cfg), fp8, world / RECORD_RANKS))
        model = RecordModel(gpt.to(device), doc_len(cfg.seq_len)).to(device)
        self.model_schedule(model, 0, cfg)
        return model

    @staticmethod
    def _gpt_config(fields: dict, fp8: bool = False, grad_scale: float = 1.0):
        from job.speedrun_2026_07_17.transformer import GPTConfig

        return GPTConfig(vocab_size=fields["vocab_size"], num_heads=fields["n_head"], head_dim=fields["n_embd"] // fields["n_head"],
                         model_dim=fields["n_embd"], max_seq_len=fields["block_size"], fp8=fp8, grad_scale=grad_scale,
                         bigram_dim=fields["n_embd"] // 4)  # the record's 192 of 768

    def model_from_config(self, config):
        from job.speedrun_2026_07_17.transformer import GPT
        from job.speedrun_2026_07_17.wiring import RecordModel

        return RecordModel(GPT(self._gpt_config(config)), doc_len(config.get("seq_len", 0)))

    def build_optimizers(self, model, cfg, device_type):
        from job.speedrun_2026_07_17.normuon import NorMuonAndAdam
        from job.speedrun_2026_07_17.param_table import ADAM, NORMUON, PARAM_TABLE, WORK_ORDER, labelled
        from job.speedrun_2026_07_17.wiring import RecordOptimizer

        # The bigram embedding's gradient travels as the rows this rank's batches touched (batch_taken marks them),
        # as the record's does on eight ranks; on one rank nothing travels.
        opt = NorMuonAndAdam(labelled(model.gpt), PARAM_TABLE, WORK_ORDER, ADAM, NORMUON, sparse_comms=True,
                             compile=device_type == "cuda" and cfg.compile != "off")
        return [RecordOptimizer(opt, model)]

    def batch_taken(self, optimizers, x, y):
        for opt in optimizers:
            opt.mark_batch(x, y)

    def schedule(self, optimizers, step, cfg):
        settings = training_schedule(cfg.hp).at(step)
        for opt in optimizers:
            opt.settings = settings
        return {"lr": settings.lr, "muon_momentum": settings.muon_momentum, "stage": settings.stage,
                "adam": float(settings.adam), "mtp_weights": len(settings.mtp_weights)}

    def loader(self, data_dir, split, micro_batch, seq_len, rank, world, pin_memory=False, step_tokens=None):
        from job.speedrun_2026_07_17.bos_loader import DocLoader, ValLoader
        from job.speedrun_2026_07_17.wiring import TrainBatches, ValBatches

        if split == "val":  # windows of --val-seq-len, eight to a record's step
            return ValBatches(ValLoader(data_dir, seq_len * RECORD_RANKS, rank, world))
        return TrainBatches(DocLoader(data_dir, split, rank, world), doc_len)

    def model_schedule(self, model, step, cfg):
        schedule = training_schedule(cfg.hp)
        model.set_step(schedule, schedule.at(step))

    def backward_scale(self, cfg, layout):
        return float(layout.seq_len)  # the record's loss is the sum over the sequence's positions, not the mean

    def describe(self, model, cfg):
        from job.speedrun_2026_07_17.varlen import kernel_name

        precision = "FP8 MLPs and output layer" if model.gpt.config.fp8 else "bf16 (no FP8 on this device)"
        attention = kernel_name(model.gpt.lm_head.weight.device)
        return f" | {precision} | attention {attention} | stages {training_schedule(cfg.hp).boundaries}"


def _boundaries(hp, n_stages: int) -> list[int]:
    """The stages' end steps, as TrainingSchedule rounds them (torch-free, for the launcher's layouts)."""
    from itertools import accumulate

    from job.speedrun_2026_07_17.schedule import STAGES

    ends = [round(c * hp.scheduled_steps) for c in accumulate(s.duration for s in STAGES[:-1])]
    return [*ends, hp.scheduled_steps + hp.extension_steps][:n_stages]


def _model_fields(cfg) -> dict:
    return {k: getattr(cfg, k) for k in ("vocab_size", "n_head", "n_embd", "block_size")}


RECIPE = Speedrun()
