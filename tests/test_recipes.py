"""The recipe seam: a recipe defined here, in the test, trains and resumes exactly through the real loop of
job/train.py; several optimizers checkpoint together; building a Trainer changes no process-wide state."""

import shutil
import signal
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL, events, losses
from job import checkpoint as ckpt_lib
from job import recipes
from job.config import parse_args
from job.optim import Optimizers
from job.runtime import Runtime
from job.train import Trainer, main


class Bigram(torch.nn.Module):
    """The smallest language model the trainer can run: next-token logits from the current token alone."""

    def __init__(self, vocab_size: int, block_size: int, dim: int = 8):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size)
        self.emb = torch.nn.Embedding(vocab_size, dim)
        self.head = torch.nn.Linear(dim, vocab_size)

    def forward(self, idx, targets=None):
        logits = self.head(self.emb(idx))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len=None) -> float:
        return 6.0 * self.num_params()


class Toy(recipes.Recipe):
    """Two optimizers (SGD with momentum for the embedding, Adam for the head) and a schedule that warms up both the
    learning rate and SGD's momentum: the shape of modded-nanogpt's Muon + Adam recipe."""

    name = "toy"

    def build_model(self, cfg, device, compute_dtype):
        return Bigram(cfg.vocab_size, cfg.block_size).to(device)

    def build_optimizers(self, model, cfg, device_type):
        return [torch.optim.SGD(model.emb.parameters(), lr=0.5, momentum=0.5),
                torch.optim.Adam(model.head.parameters(), lr=1e-2)]

    def schedule(self, optimizers, step, cfg):
        scale = min(1.0, (step + 1) / cfg.warmup_steps)
        momentum = 0.5 + 0.4 * scale
        sgd, adam = optimizers
        for group in sgd.param_groups:
            group["lr"], group["momentum"] = 0.5 * scale, momentum
        for group in adam.param_groups:
            group["lr"] = 1e-2 * scale
        return {"lr": 1e-2 * scale, "momentum": momentum}


@pytest.fixture
def toy():
    recipes.register(Toy())
    yield
    recipes.unregister("toy")


@pytest.fixture
def quiet_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # main() would set it in this process


def train(shards, log, *extra):
    main([*SMALL, "--data-dir", str(shards), "--log-dir", str(log), *map(str, extra)])


def test_a_recipe_defined_outside_the_trainer_trains_and_resumes_exactly(shards, tmp_path, toy, quiet_env):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    ref = tmp_path / "ref"
    train(shards, ref, "--recipe", "toy", "--max-steps", 8, "--checkpoint-every", 4)
    ls = losses(ref)
    assert sorted(ls) == list(range(8)) and ls[7] < ls[0]  # it learns
    assert [round(e["momentum"], 6) for e in events(ref, "train")][:2] == [0.58, 0.66]  # the schedule's own values
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # the run put the handlers back
    ck = torch.load(ref / "model_00004.pt", weights_only=True)
    assert ck["train_config"]["recipe"] == "toy" and ck["step"] == 4
    sgd_state, adam_state = ck["optimizer"]["optimizers"]
    assert sgd_state["param_groups"][0]["momentum"] == pytest.approx(0.5 + 0.4 * 4 / 5)
    assert "exp_avg" in next(iter(adam_state["state"].values()))

    log = tmp_path / "log"  # the same run, stopped after step 4's checkpoint, then the same command again
    log.mkdir()
    shutil.copy(ref / "model_00004.pt", log)
    train(shards, log, "--recipe", "toy", "--max-steps", 8, "--checkpoint-every", 4)
    assert events(log, "resume")[0]["step"] == 4
    got = losses(log)
    assert sorted(got) == list(range(4, 8))
    for step in got:
        assert got[step] == ls[step], step  # bit for bit: weights, both optimizers' states, data position


def test_another_recipes_checkpoint_is_refused_in_one_line(shards, tmp_path, toy, quiet_env, capsys):
    log = tmp_path / "log"
    train(shards, log, "--recipe", "toy", "--max-steps", 2)
    with pytest.raises(SystemExit) as e:
        train(shards, log, "--max-steps", 4)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: checkpoint {log / 'model_00002.pt'} was trained with --recipe toy (this run: gpt2): use "
                   "--recipe toy, another --log-dir, or --resume never to start fresh"]


def test_recipe_flag_offers_the_registered_recipes():
    assert recipes.names()[0] == "gpt2" and parse_args(["--recipe", "gpt2"]).recipe == "gpt2"
    assert parse_args([]).recipe == "gpt2"


def test_building_a_trainer_changes_no_process_wide_state(shards, tmp_path):
    cfg = parse_args([*SMALL, "--data-dir", str(shards), "--log-dir", str(tmp_path / "log"), "--max-steps", "2"])
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    rng, tf32 = torch.get_rng_state(), torch.backends.cuda.matmul.allow_tf32
    a = Trainer(cfg, Runtime(False, 0, 0, 1, "cpu", "cpu"))
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert torch.equal(torch.get_rng_state(), rng) and torch.backends.cuda.matmul.allow_tf32 == tf32
    # The initial weights still follow from the seed alone.
    b = Trainer(cfg, Runtime(False, 0, 0, 1, "cpu", "cpu"))
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    a.run()  # the run installs its handlers while it trains, and puts the previous ones back
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert [s for s, _ in ckpt_lib.list_checkpoints(cfg.log_dir)] == [2]


def test_several_optimizers_checkpoint_together_and_one_keeps_its_old_layout():
    w, v = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    one = Optimizers([torch.optim.AdamW([w, v])])
    (w.sum() + v.sum()).backward()
    one.step()
    assert one.state_dict().keys() == {"state", "param_groups"}  # what checkpoints with one optimizer always held
    two = Optimizers([torch.optim.SGD([w], lr=0.1, momentum=0.9), torch.optim.Adam([v])])
    two.step()
    state = two.state_dict()
    assert len(state["optimizers"]) == 2 and len(two.param_groups) == 2
    fresh = Optimizers([torch.optim.SGD([w], lr=0.1, momentum=0.9), torch.optim.Adam([v])])
    fresh.load_state_dict(state)
    assert torch.equal(fresh.optimizers[0].state[w]["momentum_buffer"], two.optimizers[0].state[w]["momentum_buffer"])
    with pytest.raises(ValueError, match="holds 2 optimizer states and this recipe builds 1"):
        Optimizers([torch.optim.SGD([w], lr=0.1)]).load_state_dict(state)
