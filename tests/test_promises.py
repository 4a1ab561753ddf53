"""The trainer's promises, for every recipe: a run killed mid-step and run again, then stopped by SIGTERM and run
again, repeats the uninterrupted run's losses exactly; two ranks under torchrun train what one does, and a kill of every
process resumes too.

The interruptions run in this process, through the trainer's own parser and Trainer (a kill is an exception raised
inside the step, a SIGTERM the real signal sent to this process while the run's handlers are installed), so both runs
compare bit for bit. What only separate processes can show (torchrun's ranks, SIGKILL of all of them, the same command
resuming) is one process-level run per recipe.
"""

import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import PROMISE_STEPS, RECIPE_ARGS, REFERENCES, ROOT, env, events, losses, recipe_argv, train_in_process, wait_for
from forkserver import kill_tree
from job import checkpoint as ckpt_lib
from job.config import parse_args
from job.train import Trainer

STEPS = PROMISE_STEPS
RECIPES = list(RECIPE_ARGS)
pytestmark = REFERENCES


def argv(recipe, data_dir, log, *extra) -> list[str]:
    return recipe_argv(recipe, data_dir, log, *extra)


def accumulated(recipe, ranks: int) -> int:
    """The micro-steps of the recipe's first step on this many ranks (the speedrun's step is eight sequences)."""
    cfg = parse_args([*RECIPE_ARGS[recipe], "--max-steps", str(STEPS)], files=False)
    layout = cfg.card.step_layout(0, cfg)
    return layout.tokens // (layout.micro_batch * layout.seq_len * ranks)


class Killed(BaseException):
    """Stands for SIGKILL: the run ends in the middle of a step, with no checkpoint of its own."""


def run(recipe, data_dir, log, *extra, before_step: int | None = None, action=None) -> Trainer:
    return train_in_process(argv(recipe, data_dir, log, *extra), before_step, action)


def assert_same_losses(log, reference, rel=0.0):
    got, want = losses(log), losses(reference)
    assert sorted(got) == list(range(STEPS)) == sorted(want)
    for step in want:
        if rel:
            assert got[step] == pytest.approx(want[step], rel=rel), step
        else:
            assert got[step] == want[step], step  # bit for bit: weights, optimizers' states, data position, RNG


@pytest.mark.parametrize("recipe", RECIPES)
def test_an_uninterrupted_run_learns_evaluates_samples_and_checkpoints(recipe, references):
    log = references[recipe]
    ls = losses(log)
    assert sorted(ls) == list(range(STEPS)) and ls[STEPS - 1] < ls[0] - 0.5
    assert [v["step"] for v in events(log, "val")] == [0, 5, 10, 12]
    assert [h["step"] for h in events(log, "hellaswag")] == [0, 6, 12]
    assert [s["step"] for s in events(log, "sample")] == [6, 12] and len(events(log, "sample")[-1]["samples"]) == 2
    assert [s for s, _ in ckpt_lib.list_checkpoints(log)] == [4, 8, 12]
    ck = torch.load(log / "model_00012.pt", map_location="cpu", weights_only=True)
    assert ck["train_config"]["recipe"] == recipe and ck["step"] == 12
    assert ck["val_loss"] == pytest.approx(events(log, "val")[-1]["loss"])
    assert [e["reason"] for e in events(log, "end")] == ["done"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_kill_mid_step_and_a_sigterm_each_leave_a_run_that_the_same_command_resumes_exactly(recipe, references, corpora,
                                                                                              tmp_path):
    """One run interrupted twice, each time followed by the same command: killed mid-step, then stopped by SIGTERM
    in the run that resumed, then finished. Its losses are the uninterrupted run's, bit for bit."""
    def kill(trainer):
        raise Killed

    log = tmp_path / "log"
    # Past the step-3 checkpoint: the model after step 2, an even step (the 2026-07-17 record's Adam gradients of an
    # even step wait in it for the odd one). A kill leaves no checkpoint of its own.
    with pytest.raises(Killed):
        run(recipe, corpora[recipe], log, "--checkpoint-every", 3, before_step=5, action=kill)
    assert [s for s, _ in ckpt_lib.list_checkpoints(log)] == [3] and max(losses(log)) == 4
    # The same command resumes from step 3; a SIGTERM before step 7 lets that step finish and saves the model after
    # it: a checkpoint at 8, off the periodic ones' multiples of 3, after an odd step.
    handlers = signal.getsignal(signal.SIGTERM)
    trainer = run(recipe, corpora[recipe], log, "--checkpoint-every", 3, before_step=7,
                  action=lambda t: os.kill(os.getpid(), signal.SIGTERM))  # the real signal, to the run's own handler
    assert signal.getsignal(signal.SIGTERM) == handlers  # the run put the handler back
    assert [e["step"] for e in events(log, "resume")] == [3]
    assert [s for s, _ in ckpt_lib.list_checkpoints(log)] == [3, 6, 8] and max(losses(log)) == 7
    assert [e["reason"] for e in events(log, "end")] == ["stopped"] and trainer.stop.requested
    run(recipe, corpora[recipe], log, "--checkpoint-every", 3)  # the same command again finishes the run
    assert [e["step"] for e in events(log, "resume")] == [3, 8]
    assert_same_losses(log, references[recipe])


# How far two ranks' losses may be from one rank's, by recipe (default: 1e-4, the float32 recipes' summation order).
# The 2026-07-17 record keeps bf16 weights and gradients, which two ranks sum in another order, so an element can land
# one bf16 rounding (2^-8 of itself) apart and the next steps carry it on: measured on the dev VM (AMD EPYC) at
# conftest's size, the step losses at most 4.8e-4 apart (7.1e-4 on a Xeon at twice the tokens a step); the bound is
# about three times that. Its weights are not compared element by element: Adam's normalised step turns the rounding
# noise of some embedding rows' near-zero gradients into whole updates (measured at twice the tokens a step: up to 3.8
# in value_embeds and bigram_embed). That the resume itself is exact on two ranks is shown bit for bit against the
# killed run's own steps, which no tolerance blurs.
TWO_RANK_LOSS_REL = {"speedrun": 1.5e-3}
ELEMENTWISE_WEIGHTS = {"gpt2", "speedrun-2025-05-24"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_two_ranks_match_one_and_survive_a_kill_of_every_process(recipe, references, corpora, hellaswag_rows, tmp_path):
    """torchrun with two CPU ranks (gloo): each takes half of every step's sequences, so the losses are one rank's up
    to the float summation order. SIGKILL of the whole process group after the step-3 checkpoint (the model after
    step 2: an even step, after which the 2026-07-17 record's Adam gradients wait, averaged over the ranks, for the
    odd one), then the same command: the run resumes and ends where one rank does."""
    log = tmp_path / "ddp"
    # torchrun's own per-start directory (it makes one in /tmp otherwise, and leaves it) in the test's.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir", tmp_path / "torchrun",
           "-m", "job.train",
           *argv(recipe, corpora[recipe], log, "--checkpoint-every", 3, "--hellaswag-every", 6, "--hellaswag-path", hellaswag_rows)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Once the step-3 checkpoint is written (in the background, maybe after step 4) and before the step-6 one.
    wait_for(lambda: [s for s, _ in ckpt_lib.list_checkpoints(log)] == [3] and 4 in losses(log), proc)
    kill_tree(proc.pid)  # the agent and both ranks at once
    proc.wait()
    assert [s for s, _ in ckpt_lib.list_checkpoints(log)] == [3]
    killed = losses(log)
    again = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "device cpu x 2" in again.stdout and f"x 2 ranks x {accumulated(recipe, 2)} accum" in again.stdout
    assert events(log, "resume")[0]["step"] == 3
    # Steps 3 and 4 again, from the step-3 checkpoint (and, for the 2026-07-17 record, the even step's Adam gradients
    # saved in it): two ranks' arithmetic both times, so bit for bit.
    resumed = losses(log)
    assert {s: resumed[s] for s in (3, 4)} == {s: killed[s] for s in (3, 4)}
    reference = references[recipe]
    rel = TWO_RANK_LOSS_REL.get(recipe, 1e-4)
    assert_same_losses(log, reference, rel=rel)  # same batches; only the summation order differs
    if "--val-tokens" in RECIPE_ARGS[recipe]:  # a validation set fixed in tokens is the same on any number of ranks
        val = {v["step"]: v["loss"] for v in events(log, "val")}  # the resumed run's evaluations replace the killed one's
        assert val == pytest.approx({v["step"]: v["loss"] for v in events(reference, "val")}, rel=rel)
    # HellaSwag examples are split over the two ranks and the counts summed: every example is scored once.
    hella, hella_ref = events(log, "hellaswag")[-2:], events(reference, "hellaswag")[-2:]
    assert [(h["step"], h["total"]) for h in hella] == [(h["step"], h["total"]) for h in hella_ref] == [(6, 5), (12, 5)]
    assert all(abs(a["correct"] - b["correct"]) <= 1 for a, b in zip(hella, hella_ref, strict=True))
    a = torch.load(log / "model_00012.pt", weights_only=True)
    b = torch.load(reference / "model_00012.pt", weights_only=True)
    assert {k: v.shape for k, v in a["model"].items()} == {k: v.shape for k, v in b["model"].items()}
    for k in b["model"]:
        assert torch.isfinite(a["model"][k].float()).all(), k
        if k.endswith("bigram_embed.weight"):
            # The 2026-07-17 record's bigram rows start at zero and move once a batch touches them. On two ranks only
            # the touched rows travel to the rank that owns them: one rank's rows moved, and only those, where each
            # rank's batches were marked.
            assert a["model"][k].abs().sum(1).nonzero().tolist() == b["model"][k].abs().sum(1).nonzero().tolist()
        if recipe in ELEMENTWISE_WEIGHTS:
            torch.testing.assert_close(a["model"][k].float(), b["model"][k].float(), rtol=1e-3, atol=1e-4)
    # Rank 0's checkpoint holds every optimizer state (the speedruns' Muons split their work over the ranks, and the
    # current record's NorMuon its state too, gathered at a save).
    assert optimizer_layout(a["optimizer"]) == optimizer_layout(b["optimizer"])


def optimizer_layout(state: dict) -> list[dict]:
    """Each optimizer's saved entries and how many items each holds, whatever the optimizer's own layout."""
    return [{k: len(v) if hasattr(v, "__len__") else v for k, v in o.items()} for o in state.get("optimizers", [state])]


# A checkpoint of the run with one entry edited, as a hand or another program might leave it.
EDITS = {
    "optimizer": lambda c: c.update(optimizer={}),
    "data": lambda c: c.update(data={"position": "x"}),
    "rng": lambda c: c.update(rng={"torch": torch.zeros(3)}),
    "weights": lambda c: c["model"].popitem(),
    "step": lambda c: c.update(step="12"),
    "no rng": lambda c: c.pop("rng"),
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_an_edited_checkpoint_is_refused_in_one_line_and_auto_resume_passes_over_a_foreign_one(recipe, references, corpora,
                                                                                              tmp_path, capsys):
    from job.errors import UserError
    from job.runtime import setup_runtime

    newest = ckpt_lib.list_checkpoints(references[recipe])[-1][1]
    for name, edit in EDITS.items():
        ckpt = torch.load(newest, weights_only=True)
        edit(ckpt)
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(ckpt, path)
        cfg = parse_args(argv(recipe, corpora[recipe], tmp_path / "log", "--resume", path))
        with pytest.raises(UserError) as e:
            Trainer(cfg, setup_runtime(cfg))
        assert str(path) in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    # --resume auto: a file of another program's, newest by its name, is passed over with a warning
    log = tmp_path / "auto"
    log.mkdir()
    (log / newest.name).write_bytes(newest.read_bytes())
    torch.save({"weights": torch.zeros(2)}, log / "model_99999.pt")
    cfg = parse_args(argv(recipe, corpora[recipe], log))
    assert Trainer(cfg, setup_runtime(cfg)).start_step == STEPS
    assert f"warning: skipping {log / 'model_99999.pt'}: " in capsys.readouterr().err
