"""The training schedule of modded-nanogpt's record of 2026-07-17: 1380 scheduled steps in three stages that grow the
batch, the sequence length and the attention windows and drop the multi-token-prediction targets, then 10 steps of
extension with longer windows; a learning rate that cools down over the last 60% of the scheduled steps; Muon's
momentum warmed up over the first 300 steps and cooled down over the last 50; Adam stepped on odd steps only; the
embedding untied from the output layer at the third stage.

Every quantity is a pure function of the step (`TrainingSchedule.at`), so a run resumed at any step trains with the
same settings as one that got there without stopping. The arithmetic is the record's, operation for operation: a
learning rate or a weight computed here is the same float the record computes.

The stage table, as the record has it (windows in blocks of 128 tokens; MTP: the loss weights of the next 1, 2, 3
tokens' predictions, moved linearly from start to end over the stage):

| steps | tokens a step | sequence | windows | lr | MTP weights |
| --- | --- | --- | --- | --- | --- |
| 0-459 | 8 x 16,384 | 896 | 1, 3 | 1.0 | (1, 0.5, 0.25) -> (1, 0.5, 0) |
| 460-919 | 8 x 32,768 | 2048 | 3, 7 | 1.52 | (1, 0.5) -> (1, 0) |
| 920-1379 | 8 x 49,152 | 2048 | 5, 11 | 1.73 | (1) |
| 1380-1389 | 8 x 49,152 | 2048 | 6, 13 | 0.15 | (1) |

The final validation (step 1390) uses a long window of 20 blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, pairwise

BLOCK = 128  # attention windows come in whole blocks of this many tokens
RECORD_RANKS = 8  # the record's GPUs: a step's tokens are cut into this many sequences


@dataclass(frozen=True)
class TrainingStage:
    lr: float  # the learning-rate multiplier before the cooldown (the batch's square-root-ish scaling)
    batch_tokens: int  # tokens of one optimizer step, over all ranks and micro-steps
    seq_len: int  # the longest piece of one document a sequence holds (longer documents are cut)
    windows: tuple[int, int]  # the short and the long attention window, in blocks
    mtp_start: tuple[float, ...]  # multi-token-prediction loss weights at the stage's first step...
    mtp_end: tuple[float, ...]  # ...moved linearly to these at its end
    duration: float | None = None  # the fraction of the scheduled steps; None for the extension, which comes last


# lr: 1.52 = (16/8)**0.6 and 1.73 = (24/8)**0.5 for the larger batches; the extension's is never used (the cooldown has
# reached FINAL_LR by then).
STAGES = (
    TrainingStage(duration=1 / 3, seq_len=896, batch_tokens=8 * 16384, windows=(1, 3), lr=1.0, mtp_start=(1.0, 0.5, 0.25), mtp_end=(1.0, 0.5, 0.0)),
    TrainingStage(duration=1 / 3, seq_len=2048, batch_tokens=8 * 32768, windows=(3, 7), lr=1.52, mtp_start=(1.0, 0.5), mtp_end=(1.0, 0.0)),
    TrainingStage(duration=1 / 3, seq_len=2048, batch_tokens=8 * 49152, windows=(5, 11), lr=1.73, mtp_start=(1.0,), mtp_end=(1.0,)),
    TrainingStage(seq_len=2048, batch_tokens=8 * 49152, windows=(6, 13), lr=1.0, mtp_start=(1.0,), mtp_end=(1.0,)),
)
SCHEDULED_STEPS, EXTENSION_STEPS = 1380, 10
COOLDOWN_FRAC, FINAL_LR = 0.6, 0.15
UNTIE_STAGE = 2  # the embedding gets its own weights from this stage's first odd step
FINAL_LONG_WINDOW = 20  # blocks: the long window of the final validation
MUON_MOMENTUM = (0.85, 0.95)  # from the first to the second over the warm-up, back over the cool-down
MUON_WARMUP, MUON_COOLDOWN = 300, 50
# The MLP's FP8 down projection rescales from its weights (not its history) for the forwards before this step: the
# record's quantisation after step s bootstraps while s < 16, so step 16's forward is the last so scaled.
FP8_BOOTSTRAP_STEPS = 17


@dataclass(frozen=True)
class StepSettings:
    """What one step trains with."""

    step: int
    stage: int  # index into the schedule's stages (the last is the extension)
    lr: float  # the factor on every parameter's initial learning rate
    batch_tokens: int
    seq_len: int
    windows: tuple[int, int]  # (short, long), in blocks
    mtp_weights: tuple[float, ...]
    muon_momentum: float
    adam: bool  # Adam's parameters are updated on odd steps only (their gradients accumulate over two steps)
    untie: bool  # after this step's update the embedding takes the output layer's weights and Adam state, and goes its own way
    tied: bool  # the embedding still shares the output layer's weights during this step
    fp8_bootstrap: bool
    long_window_change: tuple[int, int] | None  # (old, new) long window in tokens where this step changes it: YaRN rescales

    @property
    def window_tokens(self) -> tuple[int, int]:
        return self.windows[0] * BLOCK, self.windows[1] * BLOCK


class TrainingSchedule:
    def __init__(
        self,
        stages=STAGES,
        scheduled_steps: int = SCHEDULED_STEPS,
        extension_steps: int = EXTENSION_STEPS,
        cooldown_frac: float = COOLDOWN_FRAC,
        untie_stage: int = UNTIE_STAGE,
    ):
        self.stages = stages
        self.scheduled_steps = scheduled_steps
        self.cooldown_frac = cooldown_frac
        self.total_steps = scheduled_steps + extension_steps  # the last one only validates
        # The record's boundaries: rounded cumulative fractions (1/3 + 1/3 is 0.666..., and 1380 times it rounds to 920).
        ends = [0, *[round(c * scheduled_steps) for c in accumulate(s.duration for s in stages[:-1])], self.total_steps]
        if ends[-2] != scheduled_steps:
            raise ValueError(f"the stages' durations add up to {ends[-2]} of {scheduled_steps} scheduled steps")
        self.boundaries = list(pairwise(ends))
        self.untie_step = self.boundaries[untie_stage][0] | 1  # odd: the step must update Adam's parameters

    def lookup(self, step: int) -> tuple[int, float]:
        """The stage of a step and how far into it the step is (0 at its first step, 1 past the last stage)."""
        for i, (start, end) in enumerate(self.boundaries):
            if step < end:
                return i, (step - start) / (end - start)
        return len(self.stages) - 1, 1.0

    def lr(self, step: int) -> float:
        lr = self.stages[self.lookup(step)[0]].lr
        cd_start = int(self.scheduled_steps * (1 - self.cooldown_frac))
        if step >= cd_start:
            t = min(1.0, (step - cd_start) / (self.scheduled_steps - cd_start))
            lr = lr * (1 - t) + FINAL_LR * t
        return lr

    def mtp_weights(self, step: int) -> tuple[float, ...]:
        i, t = self.lookup(step)
        stage = self.stages[i]
        return tuple(a + (b - a) * t for a, b in zip(stage.mtp_start, stage.mtp_end, strict=True))

    def muon_momentum(self, step: int) -> float:
        low, high = MUON_MOMENTUM
        cd_start = self.total_steps - MUON_COOLDOWN
        if step < MUON_WARMUP:
            return low + step / MUON_WARMUP * (high - low)
        if step > cd_start:
            return high - (step - cd_start) / MUON_COOLDOWN * (high - low)
        return high

    def windows(self, step: int) -> tuple[int, int]:
        """The attention windows, in blocks; the final validation's long window is longer than training's."""
        short, long = self.stages[self.lookup(step)[0]].windows
        return (short, FINAL_LONG_WINDOW) if step >= self.total_steps else (short, long)

    def at(self, step: int) -> StepSettings:
        i, _ = self.lookup(step)
        stage = self.stages[i]
        # The rotary tables follow the training long window; the final validation's longer one is not rescaled for.
        old_long, new_long = self.stages[self.lookup(max(step - 1, 0))[0]].windows[1], stage.windows[1]
        return StepSettings(
            step=step,
            stage=i,
            lr=self.lr(step),
            batch_tokens=stage.batch_tokens,
            seq_len=stage.seq_len,
            windows=self.windows(step),
            mtp_weights=self.mtp_weights(step),
            muon_momentum=self.muon_momentum(step),
            adam=step % 2 == 1,
            untie=step == self.untie_step,
            tied=step <= self.untie_step,
            fp8_bootstrap=step < FP8_BOOTSTRAP_STEPS,
            long_window_change=(old_long * BLOCK, new_long * BLOCK) if old_long != new_long else None,
        )

    def transition_steps(self) -> list[int]:
        """The first step of each stage after the first: where the batch, the windows or the weights change shape."""
        return [start for start, _ in self.boundaries[1:]]
