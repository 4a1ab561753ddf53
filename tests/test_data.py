import numpy as np
import pytest
import torch

from job.data import DeviceLoader, ShardLoader, check_data_dir, list_shards, load_shard, write_shard
from job.errors import UserError


@pytest.fixture
def counting_shards(tmp_path):
    """Shards whose token at global position i is i % 60000, so every window tells where it came from."""
    sizes = [1000, 5000, 3000, 4200]
    start = 0
    for i, n in enumerate(sizes):
        write_shard(tmp_path / f"edufineweb_{'val' if i == 0 else 'train'}_{i:06d}.npy", (np.arange(start, start + n) % 60000))
        start += n
    return tmp_path


def windows(loader, n):
    out = []
    for _ in range(n):
        x, y = loader.next_batch()
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        out.append((x, y))
    return out


def test_shards_are_memory_mapped_build_nanogpt_format(counting_shards):
    arr = load_shard(list_shards(counting_shards, "train")[0])
    assert isinstance(arr, np.memmap) and arr.dtype == np.uint16
    assert [p.name for p in list_shards(counting_shards, "val")] == ["edufineweb_val_000000.npy"]


def test_ranks_get_disjoint_windows_that_tile_the_single_rank_stream(counting_shards):
    B, T, steps = 2, 16, 40
    single = ShardLoader(counting_shards, "train", B, T, rank=0, world=1)
    ranks = [ShardLoader(counting_shards, "train", B, T, rank=r, world=2) for r in range(2)]
    seen = set()
    for _ in range(steps):
        x0, _ = ranks[0].next_batch()
        x1, _ = ranks[1].next_batch()
        a, _ = single.next_batch()
        b, _ = single.next_batch()
        # Rank 0 and 1 read exactly what one process reads in two consecutive micro-steps.
        assert torch.equal(x0, a) and torch.equal(x1, b)
        for x in (x0, x1):
            key = (int(x[0, 0]), int(x[-1, -1]))
            assert key not in seen
            seen.add(key)
            assert int(x.flatten()[-1] - x.flatten()[0]) == B * T - 1  # contiguous, never straddles shards


def test_position_saved_and_restored_exactly(counting_shards):
    a = ShardLoader(counting_shards, "train", 4, 32, rank=1, world=2)
    windows(a, 37)  # crosses shard boundaries and wraps around
    state = a.state_dict()
    b = ShardLoader(counting_shards, "train", 4, 32, rank=1, world=2)
    b.load_state_dict(state)
    for (xa, ya), (xb, yb) in zip(windows(a, 25), windows(b, 25), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_restore_refuses_a_position_from_other_data(counting_shards, tmp_path_factory):
    a = ShardLoader(counting_shards, "train", 2, 8)
    state = a.state_dict() | {"shard_name": "other_train_000009.npy"}
    with pytest.raises(UserError, match="same data dir"):
        a.load_state_dict(state)


def test_data_dir_checks(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_data_dir(tmp_path / "missing")
    write_shard(tmp_path / "x_train_000001.npy", np.arange(100))
    with pytest.raises(UserError, match="no val shards"):
        check_data_dir(tmp_path)


def test_shards_too_small_for_one_step_are_an_error(counting_shards):
    with pytest.raises(UserError, match="shorter than one step"):
        ShardLoader(counting_shards, "train", 64, 128, world=2)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_device_loader_hands_out_the_same_stream_and_resumes_exactly(counting_shards, depth):
    plain = ShardLoader(counting_shards, "train", 2, 16)
    staged = DeviceLoader(ShardLoader(counting_shards, "train", 2, 16), "cpu", depth)
    for _ in range(30):  # across shard boundaries
        (xa, ya), (xb, yb) = plain.next_batch(), staged.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # The saved position is the next batch handed out, whatever was read ahead: a resume continues there.
    state = staged.state_dict()
    assert state == plain.state_dict()
    resumed = DeviceLoader(ShardLoader(counting_shards, "train", 2, 16), "cpu", depth)
    resumed.load_state_dict(state)
    for (xa, _), (xb, _) in zip(windows(plain, 10), windows(resumed, 10), strict=True):
        assert torch.equal(xa, xb)
    resumed.reset()
    assert torch.equal(resumed.next_batch()[0], ShardLoader(counting_shards, "train", 2, 16).next_batch()[0])


def test_loader_copies_uint16_tokens_above_32767_exactly(tmp_path):
    write_shard(tmp_path / "x_train_000000.npy", np.arange(50000, 50257))  # the top of GPT-2's vocabulary
    x, y = ShardLoader(tmp_path, "train", 2, 100).next_batch()
    assert x.dtype == torch.int64 and x[0, 0].item() == 50000 and y[-1, -1].item() == 50200


# --- whole steps per shard (modded-nanogpt's rule, the speedrun recipe's loader) -----------------------------------
SEQ, RANKS = 16, 8  # a step of eight sequences, one per rank of modded-nanogpt's 8-GPU layout
STEP = SEQ * RANKS
# Past the last step each shard holds: exactly a step + 1 (modded-nanogpt moves on), 70 (less than a step: a single
# rank accumulating micro-batches used to read on into it), a step + 2 (it stays), 50.
STEP_SHARDS = [3 * STEP + 1, 2 * STEP + 70, 3 * STEP + STEP + 2, 3 * STEP + 50]


@pytest.fixture
def step_shards(tmp_path):
    """Train shards whose token at position j of shard i is 10000*i + j: a window says where it was read."""
    for i, n in enumerate(STEP_SHARDS):
        write_shard(tmp_path / f"fineweb_train_{i + 1:06d}.npy", 10000 * i + np.arange(n))
    return tmp_path


def record_steps(data_dir, steps: int) -> list[list[tuple]]:
    """What modded-nanogpt's distributed_data_generator gives its eight ranks, step by step: rank k the k-th
    sequence (+1 token) of the step's span at `pos`; the next shard when pos + batch + 1 >= the shard's length."""
    shards = iter(load_shard(p) for p in list_shards(data_dir, "train"))
    tokens, pos, out = next(shards), 0, []
    for _ in range(steps):
        if pos + STEP + 1 >= len(tokens):
            tokens, pos = next(shards), 0
        out.append([tuple(tokens[pos + k * SEQ : pos + (k + 1) * SEQ + 1].tolist()) for k in range(RANKS)])
        pos += STEP
    return out


def steps_read(loaders, steps: int) -> list[list[tuple]]:
    """Per step, the windows (x then y's last token) in the order of the window index micro-step * world + rank."""
    world = len(loaders)
    out = []
    for _ in range(steps):
        step = []
        for _ in range(RANKS // world):  # the accumulated micro-steps
            for loader in loaders:
                x, y = loader.next_batch()
                assert torch.equal(x[:, 1:], y[:, :-1])
                step.append(tuple(x.flatten().tolist()) + (int(y[-1, -1]),))
        out.append(step)
    return out


def step_loaders(data_dir, world: int, **kw) -> list[ShardLoader]:
    return [ShardLoader(data_dir, "train", 1, SEQ, rank=r, world=world, step_tokens=STEP, **kw) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_whole_step_loader_reads_the_records_sequences_on_any_number_of_ranks(step_shards, world):
    steps = 2 + 2 + 4 + 3  # every step of the four shards: three shard switches
    want = record_steps(step_shards, steps)
    # Micro-step a of rank r reads the record's window a * world + r; the step's windows are the record's eight.
    assert steps_read(step_loaders(step_shards, world), steps) == want
    assert {w[0] // 10000 for step in want for w in step} == {0, 1, 2, 3}


def test_build_nanogpt_rule_still_switches_mid_step_on_one_rank(step_shards):
    # Without step_tokens the loader is build-nanogpt's (the gpt2 recipe's): one rank accumulating eight micro-batches
    # reads three steps from the first shard (the record two), and its sixth step reads on into the 70 tokens left in
    # the second shard before it moves to the third.
    single = ShardLoader(step_shards, "train", 1, SEQ)
    shard_of = [int(single.next_batch()[0][0, 0]) // 10000 for _ in range(6 * RANKS)]
    assert shard_of[3 * RANKS - 1] == 0 and shard_of[5 * RANKS :] == [1, 1, 1, 1, 2, 2, 2, 2]


@pytest.mark.parametrize("world, then", [(2, 2), (2, 8), (8, 1), (1, 4)])
def test_whole_step_loader_resumes_exactly_even_on_another_number_of_ranks(step_shards, world, then):
    want = record_steps(step_shards, 11)
    loaders = step_loaders(step_shards, world)
    assert steps_read(loaders, 5) == want[:5]  # past the first two shard switches
    state = loaders[0].state_dict()
    assert state["into_step"] == 0 and all(x.state_dict() == state for x in loaders)
    resumed = step_loaders(step_shards, then)
    for x in resumed:
        x.load_state_dict(state)
    assert steps_read(resumed, 6) == want[5:]


def test_whole_step_loader_resumes_mid_step_through_the_device_loader(step_shards):
    # The device loader's position is that of the next batch handed out, here in the middle of the fourth step: the
    # 70-token tail of the second shard must still be skipped when that step ends.
    want = [w for step in record_steps(step_shards, 6) for w in step]
    a = DeviceLoader(ShardLoader(step_shards, "train", 1, SEQ, step_tokens=STEP), "cpu", depth=2)
    got = [w for step in steps_read([a], 3) for w in step] + [tuple(a.next_batch()[1].flatten().tolist()) for _ in range(3)]
    state = a.state_dict()
    assert state["into_step"] == 3 * SEQ
    b = DeviceLoader(ShardLoader(step_shards, "train", 1, SEQ, step_tokens=STEP), "cpu", depth=0)
    b.load_state_dict(state)
    got += [tuple(b.next_batch()[1].flatten().tolist()) for _ in range(RANKS - 3)] + [w for step in steps_read([b], 2) for w in step]
    assert [w[-SEQ:] for w in got] == [w[-SEQ:] for w in want]  # y: the window's last SEQ tokens


def test_whole_step_loader_refuses_shards_shorter_than_a_step_and_other_layouts(step_shards, tmp_path_factory):
    short = tmp_path_factory.mktemp("short")
    write_shard(short / "x_train_000001.npy", np.arange(STEP + 1))  # what a step reads, but the record needs one more
    with pytest.raises(UserError, match=f"shorter than one step's {STEP + 2} tokens"):
        ShardLoader(short, "train", 1, SEQ, step_tokens=STEP)
    with pytest.raises(ValueError, match="whole number of micro-batches"):
        ShardLoader(step_shards, "train", 1, SEQ, world=3, step_tokens=STEP)
    with pytest.raises(ValueError, match="one layout"):
        ShardLoader(step_shards, "train", 1, SEQ, step_tokens=STEP).next_batch(2, SEQ)
