"""The record's parts in the trainer's shapes: the model as a module of (x, y) -> (None, mean loss) (and of token ids
-> logits, for HellaSwag and sampling), its loaders as
loaders of (x, y) batches, its optimizer as one of the trainer's optimizers. job/recipes/speedrun.py wires
them into the loop; nothing here decides a hyperparameter.

A batch crosses the trainer (and its copy to the device) as two tensors, so a sequence's inputs, bigram hashes and
document table travel as one int32 tensor, `pack`ed and `unpack`ed here: x = inputs | bigram hashes | cum_seqlens,
each of the first two as long as the targets y.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from job.model import generate
from job.speedrun_2026_07_17.bos_loader import DocBatch, DocLoader, ValLoader, one_document
from job.speedrun_2026_07_17.normuon import NorMuonAndAdam
from job.speedrun_2026_07_17.param_table import train_step
from job.speedrun_2026_07_17.schedule import BLOCK, FP8_BOOTSTRAP_STEPS, RECORD_RANKS, StepSettings, TrainingSchedule
from job.speedrun_2026_07_17.transformer import GPT, LAYERS, LONG_WINDOW_LAYERS, NO_ATTENTION_LAYER, ForwardSchedule


def pack(batch: DocBatch) -> tuple[Tensor, Tensor]:
    return torch.cat((batch.inputs, batch.bigram, batch.cum_seqlens)), batch.targets


def unpack(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs, cum_seqlens, bigram hashes) of a packed sequence."""
    T = y.numel()
    return x[:T], x[2 * T :], x[T : 2 * T]


class RecordModel(nn.Module):
    """The record's GPT with the step's forward settings, which the recipe's model_schedule sets before the step's
    evaluation and training alike; the loss is the mean over the sequence's positions (the multi-token loss in
    training, the next-token cross-entropy in evaluation)."""

    def __init__(self, gpt: GPT, doc_len: int):
        super().__init__()
        self.gpt, self.config = gpt, gpt.config
        self.forward_schedule: ForwardSchedule | None = None
        self.doc_len = doc_len
        self.rotary_window: int | None = None  # the long window the rotary tables are scaled for (None: unscaled)
        self.quantized = False  # the MLPs' FP8 copies exist (the optimizer's step refreshes them after that)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(None, the mean loss) of a packed batch (x, y); without y, (logits, None) of token ids x (B, T), each row
        one document (HellaSwag's and sampling's call, as the trainer's other models take it)."""
        if y is None:
            return self.document_logits(x), None
        inputs, seqlens, bigram = unpack(x, y)
        return None, self.gpt(inputs, y, seqlens, bigram, self.forward_schedule).mean()

    def document_logits(self, idx: Tensor) -> Tensor:
        """(B, T, vocab) logits (bf16, soft-capped, the padded vocabulary left out) of evaluation's path: each row goes
        through the model alone as a sequence of one document, laid out as the loaders lay out a batch, so its logits
        are the ones validation computes for that sequence. Rows are not packed into one sequence: the rotary
        positions, the smear and the shifted keys run across a packed sequence's documents."""
        if self.training:
            raise RuntimeError("the logits of token ids are evaluation's: call model.eval() first (a training forward "
                               "would also move the FP8 scales)")
        if self.forward_schedule is None:
            raise RuntimeError("the model has no forward schedule: the recipe's model_schedule sets the step's first")
        gpt, rows = self.gpt, []
        for row in idx:
            inputs = row.to(torch.int32)
            seqlens, bigram = one_document(inputs)
            rows.append(gpt.logits(gpt.trunk(inputs, seqlens, bigram, self.forward_schedule))[0, :, : self.config.vocab_size])
        return torch.stack(rows)

    def generate(self, idx: Tensor, max_new_tokens: int, top_k: int = 50, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
        return generate(self, idx, max_new_tokens, top_k, temperature, generator)

    def set_step(self, schedule: TrainingSchedule, settings: StepSettings) -> None:
        """The step's windows and multi-token weights, and the rotary tables scaled as the record's run has scaled
        them by this step: replayed from the start, so a resumed run's tables are a fresh run's."""
        device = self.gpt.lm_head.weight.device
        short, long = settings.window_tokens
        weights = torch.tensor(settings.mtp_weights, device=device)
        self.forward_schedule = ForwardSchedule(mtp_weights=weights, ws_short=short, ws_long=long, train_max_seq_len=self.doc_len)
        long_window = schedule.stages[settings.stage].windows[1] * BLOCK  # training's: the final validation's is not scaled for
        if long_window != self.rotary_window:
            self.gpt.reset_rotary()
            for start in schedule.transition_steps():
                change = schedule.at(start).long_window_change
                if start <= settings.step and change is not None:
                    self.gpt.rescale_rotary(*change)
            self.rotary_window = long_window
        if not self.quantized:  # a fresh or resumed model's first forward
            self.gpt.quantize_mlp_fp8(bootstrap_down=settings.fp8_bootstrap)
            self.quantized = True

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """6 per weight of the banks and the output layer, plus attention's two products over the keys a token sees at
        the record's widest training windows (the last stage's), or the sequence where shorter."""
        gpt = self.gpt
        matmul = sum(p.numel() for n, p in gpt.named_parameters() if p.ndim >= 2 and "embed" not in n)
        T = seq_len or gpt.config.max_seq_len
        short, long = 6 * BLOCK, 13 * BLOCK
        keys = sum(min(T, long if i in LONG_WINDOW_LAYERS else short) for i in range(LAYERS) if i != NO_ATTENTION_LAYER)
        return 6 * matmul + 6 * gpt.config.model_dim * keys


class TrainBatches:
    """The record's BOS-aligned training sequences, one micro-batch at a time: a step's eight sequences are planned
    at its first micro-batch (this rank's share kept), then handed out in order. The state is the position before
    the step plus how many of its micro-batches were taken, so a rewind lands on the same sequence."""

    def __init__(self, loader: DocLoader, doc_len):
        self.loader, self.doc_len = loader, doc_len  # doc_len(T): the longest document piece in a sequence of T tokens
        self._pending: list[DocBatch] = []
        self._before, self._taken, self._skip = loader.state_dict(), 0, 0

    def next_batch(self, B: int = 1, T: int | None = None) -> tuple[Tensor, Tensor]:
        if B != 1 or T is None:
            raise ValueError(f"the record's loader reads one sequence of a staged length per micro-batch, asked for ({B}, {T})")
        if not self._pending:
            self._before, self._taken = self.loader.state_dict(), 0
            self._pending = self.loader.next_step(T * RECORD_RANKS, self.doc_len(T))
            del self._pending[: self._skip]  # a rewind into the middle of a step
            self._taken, self._skip = self._skip, 0
        self._taken += 1
        return pack(self._pending.pop(0))

    def state_dict(self) -> dict:
        return {**self._before, "taken": self._taken} if self._pending else {**self.loader.state_dict(), "taken": 0}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        taken = int(state.pop("taken", 0))
        self.loader.load_state_dict(state)
        self._pending, self._before, self._taken, self._skip = [], state, 0, taken

    def reset(self) -> None:
        self.loader.reset()
        self._pending, self._taken = [], 0


class ValBatches:
    """The record's validation windows, one micro-batch at a time (window a * world + r to micro-step a of rank r)."""

    def __init__(self, loader: ValLoader):
        self.loader, self._pending = loader, []

    def next_batch(self, *shape: int) -> tuple[Tensor, Tensor]:
        if not self._pending:
            self._pending = self.loader.next_step()
        return pack(self._pending.pop(0))

    def reset(self) -> None:
        self.loader.windows.reset()
        self._pending = []

    def state_dict(self) -> dict:
        return {"val": True}

    def load_state_dict(self, state: dict) -> None:
        self.reset()


BIGRAM = "bigram_embed"  # the parameter whose gradient travels as sparse rows


class RecordOptimizer:
    """NorMuonAndAdam as one of the trainer's optimizers: the recipe's schedule hands it the step's settings, and its
    step is the record's (the step's learning rate and momentum, Adam on odd steps only, the untying), followed by the
    MLPs' FP8 copies of the new weights."""

    def __init__(self, optimizer: NorMuonAndAdam, model: RecordModel):
        self.optimizer, self.model = optimizer, model
        self.param_groups: list[dict] = []  # its learning rates are the schedule's factor, set by set_step
        self.settings: StepSettings | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to clear: the record's step clears the gradients of what it updated, and leaves Adam's gradients of
        an even step for the next one, whose update takes the sum of both."""

    def mark_batch(self, x: Tensor, y: Tensor) -> None:
        """The bigram embedding's rows a training micro-batch (packed, in host memory) touches: its gradient's
        exchange sends only those (the record's sparse rows; nothing where one rank trains)."""
        self.optimizer.mark_rows(BIGRAM, unpack(x, y)[2].numpy())

    def pending_gradients(self) -> list[dict]:
        """Adam's gradients waiting for the next step (after an even step), by label, one dict per rank in rank order
        (each rank holds its own, not yet reduced; the step they wait for sums each rank's with its new ones, then
        averages): a collective. Empty after an odd step."""
        waiting = {label: p.grad.detach() for label, p in self.optimizer.params.items() if p.grad is not None}
        if not waiting:  # the same on every rank: all ran the same step
            return []
        if self.optimizer.world == 1:
            return [{label: grad.cpu().clone() for label, grad in waiting.items()}]
        pending: list[dict] = [{} for _ in range(self.optimizer.world)]
        for label, grad in waiting.items():
            grads = [torch.empty_like(grad) for _ in range(self.optimizer.world)]
            dist.all_gather(grads, grad.contiguous())
            for rank, g in enumerate(grads):
                pending[rank][label] = g.cpu()
        return pending

    def step(self) -> None:
        if self.settings is None:
            raise RuntimeError("the recipe's schedule sets the step's settings before the step")
        train_step(self.optimizer, self.settings)
        # With FP8 off too, as the record's main program does: its scales are part of the model's state either way.
        self.model.gpt.quantize_mlp_fp8(bootstrap_down=self.settings.step + 1 < FP8_BOOTSTRAP_STEPS)

    def state_dict(self) -> dict:
        return {**self.optimizer.state_dict(), "pending_gradients": self.pending_gradients()}

    def load_state_dict(self, state: dict) -> None:
        """On as many ranks as saved, each takes its own pending gradients back, so the next step sums exactly what it
        would have; on another number of ranks each takes their mean, whose average over the ranks is the same sum up
        to the rounding of its order."""
        state = dict(state)
        pending = state.pop("pending_gradients", [])
        if isinstance(pending, dict):  # one averaged dict, as older checkpoints keep it
            pending = [pending] if pending else []
        self.optimizer.load_state_dict(state)
        if not pending:
            return
        if len(pending) == self.optimizer.world:
            mine = pending[self.optimizer.rank]
        else:
            mine = {label: torch.stack([p[label].float() for p in pending]).mean(0) for label in pending[0]}
        for label, grad in mine.items():
            param = self.optimizer.params[label]
            param.grad = grad.to(device=param.device, dtype=param.dtype)
            if label == BIGRAM:  # the even step's touched rows, to travel with the next step's: where its gradient is
                self.optimizer.mark_rows(label, grad.float().abs().sum(1).nonzero().view(-1).numpy())
