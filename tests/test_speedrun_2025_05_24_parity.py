"""The speedrun recipe as the record runs it on eight GPUs, in what a CPU can show: the sequences each step reads on
any number of ranks, compiled graphs specialised to their shapes, FlexAttention compiled once inside the model, and
DDP's forward passes without a broadcast of the model's buffers."""

from __future__ import annotations

import ast
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import clear_compilation_metrics, counters, get_compilation_metrics
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import vectorised_inductor
from job.config import parse_args
from job.data import list_shards, load_shard, write_shard
from job.runtime import Runtime
from job.speedrun_2025_05_24 import attention
from job.speedrun_2025_05_24.gpt import CausalSelfAttention, SpeedrunConfig
from job.train import Trainer

SEQ, RECORD_RANKS = 128, 8  # the recipe's sequences come in whole 128-token blocks
STEP = SEQ * RECORD_RANKS
# Past the last step each shard holds a step + 1 (the record moves on), less than a step, a step + 2 (it stays).
SHARD_TOKENS = [2 * STEP + STEP + 1, 2 * STEP + 300, 3 * STEP + STEP + 2, 2 * STEP + 5]
STEPS = 2 + 2 + 4 + 2


def speedrun_cfg(data_dir, log_dir, world: int, *extra: str):
    return parse_args(["--recipe", "speedrun-2025-05-24", "--preset", "tiny", "--n-head", "1", "--n-embd", "64", "--block-size", str(SEQ),
                       "--seq-len", str(SEQ), "--total-batch-tokens", str(STEP), "--val-seq-len", str(SEQ),
                       "--val-tokens", str(STEP), "--sample-num", "0", "--hellaswag-every", "0", "--device", "cpu",
                       "--compile", "off", "--data-dir", str(data_dir), "--log-dir", str(log_dir), *extra], world_size=world)


@pytest.fixture(scope="module")
def position_shards(tmp_path_factory):
    """A val shard and train shards whose token at position j of shard i is 10000*i + j."""
    d = tmp_path_factory.mktemp("positions")
    write_shard(d / "fineweb_val_000000.npy", np.arange(2 * STEP))
    for i, n in enumerate(SHARD_TOKENS):
        write_shard(d / f"fineweb_train_{i + 1:06d}.npy", 10000 * i + np.arange(n))
    return d


def record_steps(data_dir, steps: int) -> list[list[tuple]]:
    """The record's distributed_data_generator with its eight ranks: rank k reads the k-th sequence (+1 token) of the
    step's span at `pos`, and the next shard is opened when pos + batch + 1 >= the shard's length."""
    shards = iter(load_shard(p) for p in list_shards(data_dir, "train"))
    tokens, pos, out = next(shards), 0, []
    for _ in range(steps):
        if pos + STEP + 1 >= len(tokens):
            tokens, pos = next(shards), 0
        out.append(sorted(tuple(tokens[pos + k * SEQ : pos + (k + 1) * SEQ + 1].tolist()) for k in range(RECORD_RANKS)))
        pos += STEP
    return out


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_every_step_reads_the_records_sequences_whatever_the_number_of_ranks(position_shards, tmp_path, world):
    """Each rank's trainer, built as torchrun's rank r of `world` would build it, hands its step the batches its
    train_step asks for: over the ranks and accumulated micro-steps, the eight sequences the record's ranks read at
    that step, across three shard switches."""
    trainers = [Trainer(speedrun_cfg(position_shards, tmp_path / "log", world), Runtime(False, r, r, world, "cpu", "cpu"))
                for r in range(world)]
    assert {t.grad_accum for t in trainers} == {RECORD_RANKS // world}
    got = []
    for _ in range(STEPS):
        windows = []
        for t in trainers:
            for _ in range(t.grad_accum):
                x, y = t.train_loader.next_batch()
                windows.append(tuple(x.flatten().tolist()) + (int(y[0, -1]),))
        got.append(sorted(windows))
    want = record_steps(position_shards, STEPS)
    assert {w[0] // 10000 for step in want for w in step} == {0, 1, 2, 3}
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"step {step}"


@pytest.fixture
def process_group_of_one():
    """A real gloo process group of one rank in this process: the trainer then wraps its model in DDP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield Runtime(True, 0, 0, 1, "cpu", "cpu")
    dist.destroy_process_group()


def test_ddp_broadcasts_no_buffers_before_a_forward(position_shards, tmp_path, process_group_of_one):
    """The record all-reduces gradients and nothing else; DDP by default also broadcasts every buffer from rank 0
    before each forward, here the rotary tables (1.5 GB at full size). They, like the window the recipe's schedule
    sets on every rank, are the same on every rank by construction."""
    trainer = Trainer(speedrun_cfg(position_shards, tmp_path / "log", 1), process_group_of_one)
    ddp = trainer.train_model
    assert isinstance(ddp, DDP) and ddp.module is trainer.model
    buffers = dict(trainer.model.named_buffers())
    assert "window_blocks" in buffers and any(name.endswith("rotary.cos") for name in buffers)
    assert not ddp.will_sync_module_buffers()  # what DDP's forward asks before it broadcasts the buffers
    x, y = trainer.train_loader.next_batch()
    ddp(x, y)[1].backward()  # a forward and backward through the wrapper: gradients are still all-reduced
    assert all(p.grad is not None for p in trainer.model.parameters())


def flex_case():
    """A speedrun attention layer and one sequence of two blocks whose second document starts in the first block."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    attn = CausalSelfAttention(SpeedrunConfig(n_head=1, n_embd=64, block_size=2 * attention.BLOCK))
    torch.nn.init.normal_(attn.c_proj.weight)  # zero-initialised, as the record's: the output would be zero whatever the mask
    tokens = torch.randint(0, 50000, (2 * attention.BLOCK,))
    tokens[[0, 100]] = attention.BOS
    return attn, tokens, attention.block_lists(tokens), torch.randn(1, len(tokens), 64)


def window(blocks: int) -> torch.Tensor:
    return torch.tensor(blocks, dtype=torch.int32)


def test_flex_attention_in_a_compiled_model_is_one_graph_for_every_window():
    """Dynamo guards on the globals a traced function reads: one that the first call sets fails its guard at the second
    and recompiles the whole model. The guards are Dynamo's whatever the backend, so aot_eager (no code generation)
    counts them; forward only: FlexAttention has no backward pass on the CPU."""
    attn, _, lists, x = flex_case()
    compiled = torch.compile(attn, backend="aot_eager", dynamic=False)
    frames = counters["frames"]["total"]
    with torch.no_grad():
        for blocks in (1, 2, 2):  # the window is a tensor in the block mask: a new one is no new graph
            compiled(x, None, attention.flex_block_mask(lists, window(blocks)))
    assert counters["frames"]["total"] - frames == 1


@pytest.mark.slow  # Inductor's CPU code generation, twice (the model, then FlexAttention alone): ~45 s
def test_after_a_compiled_model_the_eager_model_still_keeps_the_window():
    """The eager model (sampling, HellaSwag) calls FlexAttention compiled on its own, never the eager FlexAttention
    that a compiled model's trace would leave behind: eager FlexAttention ignores the block lists, and the window with
    them. With a window of one block the second block does not see the first, where its document starts."""
    attn, tokens, lists, x = flex_case()
    compiled = torch.compile(attn, dynamic=False)
    with torch.no_grad(), vectorised_inductor():
        for model in (compiled, attn):
            for blocks in (1, 2):
                got = model(x, None, attention.flex_block_mask(lists, window(blocks)))
                want = attn(x, None, attention.dense_mask(tokens, window(blocks))[None])  # SDPA, the mask made dense
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # Inductor's CPU code generation of two graphs: ~45 s
def test_the_compiled_training_step_is_specialised_to_its_shape_after_a_longer_evaluation(position_shards, tmp_path):
    """The run evaluates first, on longer sequences than it trains on (the speedrun's: 256K tokens, then 48K), as the
    record does; the record compiles with static shapes, and so must the trainer: the training step's graph has the
    training batch's shape, no symbolic sizes. The trainer compiles any recipe's model alike: the gpt2 recipe's
    one-layer model keeps the compile short (the speedrun's twelve layers take minutes on a CPU)."""
    cfg = parse_args(["--preset", "tiny", "--n-layer", "1", "--n-head", "1", "--n-embd", "16", "--block-size", "64",
                      "--micro-batch", "2", "--seq-len", "32", "--total-batch-tokens", "64", "--val-seq-len", "64",
                      "--val-steps", "1", "--ce-chunk-tokens", "0", "--warmup-steps", "1", "--max-steps", "1",
                      "--eval-every", "1", "--checkpoint-every", "0", "--sample-num", "0", "--hellaswag-every", "0",
                      "--device", "cpu", "--compile", "on", "--data-dir", str(position_shards), "--log-dir",
                      str(tmp_path / "log")])
    torch._dynamo.reset()
    clear_compilation_metrics()
    Trainer(cfg, Runtime(False, 0, 0, 1, "cpu", "cpu")).run()  # evaluate, train a step, evaluate
    graphs = [ast.literal_eval(m.graph_node_shapes) for m in get_compilation_metrics()
              if m.graph_node_shapes and m.co_filename.endswith("job/model.py")]
    # Evaluation's graph (no grad) and training's; the second evaluation reuses the first graph.
    assert sorted((tuple(g["l_idx_"]) for g in graphs), key=str) == [(2, 32), (2, 64)]
    symbolic = {name: shape for g in graphs for name, shape in g.items() if any(isinstance(d, str) for d in shape)}
    assert not symbolic
