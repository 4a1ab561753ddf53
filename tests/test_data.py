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
