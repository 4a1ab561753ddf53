"""The recipe seam: a recipe defined here, in the test, trains and resumes exactly through the real loop of
job/train.py; several optimizers checkpoint together; building a Trainer changes no process-wide state."""

import shutil
import signal
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL, events, losses
from job import checkpoint as ckpt_lib
from job import recipes
from job.config import RUN_FIELDS, parse_args
from job.errors import UserError
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


@dataclass
class ToyHparams:
    warmup_steps: int = recipes.hparam(5, "steps of warm-up of the learning rates and of SGD's momentum")
    grow_at: int = recipes.hparam(0, "from this step on, each step takes twice the tokens, in sequences twice as long (0: never)")


class Toy(recipes.Recipe):
    """A third recipe, whole in this module: two optimizers (SGD with momentum for the embedding, Adam for the head), a
    schedule that warms up both the learning rate and SGD's momentum (the shape of modded-nanogpt's Muon + Adam recipe),
    and a batch that grows mid-run (its tokens and its sequence length, as the speedrun records stage theirs)."""

    name = "toy"
    summary = "a bigram model, for the trainer's tests"
    Hparams = ToyHparams
    presets = {"tiny": {k: v for k, v in recipes.get("gpt2").presets["tiny"].items() if k in RUN_FIELDS}}

    def staged(self, cfg):
        return cfg.hp.grow_at > 0

    def step_layout(self, step, cfg):
        if self.staged(cfg) and step >= cfg.hp.grow_at:
            return recipes.StepLayout(cfg.micro_batch, 2 * cfg.seq_len, 2 * cfg.total_batch_tokens)
        return super().step_layout(step, cfg)

    def build_model(self, cfg, device, compute_dtype):
        return Bigram(cfg.vocab_size, cfg.block_size).to(device)

    def build_optimizers(self, model, cfg, device_type):
        return [torch.optim.SGD(model.emb.parameters(), lr=0.5, momentum=0.5),
                torch.optim.Adam(model.head.parameters(), lr=1e-2)]

    def schedule(self, optimizers, step, cfg):
        scale = min(1.0, (step + 1) / cfg.hp.warmup_steps)
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


@pytest.mark.slow  # trains, twice
def test_a_recipe_that_grows_its_batch_mid_run_resumes_exactly_across_the_change(shards, tmp_path, toy, quiet_env):
    """Steps 0-2 take 256 tokens in sequences of 32, steps 3-7 512 in sequences of 64: the loop asks the recipe for each
    step's layout, the loader reads it, and a resume from before the change repeats the run to the bit."""
    ref = tmp_path / "ref"
    args = ("--recipe", "toy", "--grow-at", 3, "--max-steps", 8, "--checkpoint-every", 2, "--keep-last", 0)
    train(shards, ref, *args)
    train_events = events(ref, "train")
    assert [e["tokens"] for e in train_events] == [256] * 3 + [512] * 5
    # The data position counts every token read: 2 steps of 256, then 2 of 512 and 1 of 256 by step 4... exactly.
    assert torch.load(ref / "model_00002.pt", weights_only=True)["data"]["offset"] == 2 * 256
    assert torch.load(ref / "model_00004.pt", weights_only=True)["data"]["offset"] == 3 * 256 + 512
    ls = losses(ref)

    log = tmp_path / "log"
    log.mkdir()
    shutil.copy(ref / "model_00002.pt", log)  # from before the change
    train(shards, log, *args)
    got = losses(log)
    assert sorted(got) == list(range(2, 8))
    for step in got:
        assert got[step] == ls[step], step


def test_only_the_chosen_recipes_settings_are_offered(toy):
    with pytest.raises(UserError, match=r"^--grow-at is a setting of the toy recipe, not of gpt2"):
        parse_args(["--grow-at", "3"])
    with pytest.raises(UserError, match=r"^--max-lr is a setting of the gpt2 recipe, not of toy"):
        parse_args(["--recipe", "toy", "--preset", "tiny", "--max-lr", "0.1"])
    assert parse_args(["--recipe", "toy", "--preset", "tiny", "--grow-at", "3", "--seq-len", "32"]).hp.grow_at == 3
    # Every step's layout is checked, the grown one too.
    with pytest.raises(UserError, match=r"^--seq-len \(256\) exceeds the model's block size \(128\)"):
        parse_args(["--recipe", "toy", "--preset", "tiny", "--grow-at", "3"])


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


def test_the_worked_example_of_docs_design_md_trains(shards, tmp_path, quiet_env, capsys):
    """The recipe docs/design.md shows as the way to add one, as written there: it registers, offers its own flags only,
    and trains through the real entry point."""
    import re

    from conftest import ROOT

    code = re.search(r"#### Worked example.*?```python\n(.*?)```", (ROOT / "docs" / "design.md").read_text(), re.S).group(1)
    namespace = {"__name__": "job.recipes.sgd"}
    exec(compile(code, "docs/design.md", "exec"), namespace)  # noqa: S102 (the project's own documentation)
    recipes.register(namespace["RECIPE"])
    try:
        at = SMALL.index("--warmup-steps")
        small = SMALL[:at] + SMALL[at + 2:]  # the gpt2 recipe's flag
        main([*small, "--recipe", "sgd", "--lr", "0.05", "--max-steps", "3", "--data-dir", str(shards), "--log-dir", str(tmp_path / "log")])
        assert sorted(losses(tmp_path / "log")) == [0, 1, 2]
        assert [e["lr"] for e in events(tmp_path / "log", "train")] == [0.05] * 3
        with pytest.raises(UserError, match="--max-lr is a setting of the gpt2 recipe, not of sgd"):
            parse_args(["--recipe", "sgd", "--max-lr", "1e-3"])
    finally:
        recipes.unregister("sgd")


@pytest.mark.parametrize("recipe, flags, names, never", [
    ("gpt2", [], ["a lower learning rate, e.g. --max-lr 0.0003"], ["--muon-lr"]),
    ("gpt2", ["--grad-clip", "0"], ["--max-lr 0.0003 and --grad-clip 1.0"], []),
    ("speedrun-2025-05-24", [], ["--muon-lr 0.025", "--adam-lr-head"], ["--max-lr", "--grad-clip"]),
])
def test_the_divergence_advice_names_the_recipes_own_flags(recipe, flags, names, never, tmp_path):
    """The line a diverged run ends with, made by the trainer's own failure path (job.failures) and Checkpointer."""
    from job import checkpoint as ckpt_lib
    from job.failures import diverged_error
    from job.metrics import MetricsLogger

    cfg = parse_args(["--recipe", recipe, "--log-dir", str(tmp_path), *flags])
    ckpt = ckpt_lib.Checkpointer(tmp_path, 3, 0, True, MetricsLogger(tmp_path))
    line = str(diverged_error(cfg, Runtime(False, 0, 0, 1, "cpu", "cpu"), 7, "the loss is nan", ckpt))
    assert f"no checkpoint was written to {tmp_path}: start again with" in line
    for name in names:
        assert name in line, line
    for name in never:
        assert name not in line, line
    # And every flag it names is one the recipe's parser takes.
    for flag in ("--max-lr", "--grad-clip", "--muon-lr", "--adam-lr-head"):
        if flag in line:
            parse_args(["--recipe", recipe, flag, "0.01"])
