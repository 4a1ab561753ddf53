"""One card per recipe (job/recipes/): the trainer and the laptop's launcher read the same module, so the launcher
sizes, prices and refuses a run exactly as the trainer would take it, before any connection or money; and every
`fab launch` flag is defined once (infra/flags.py)."""

import inspect
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line_error
from infra.container import BUNDLED_SHARD_TOKENS, Job
from infra.flags import fab_help, fab_signature, from_flags
from infra.options import CloudOptions, LaunchOptions
from job import config, contract, recipes
from job.errors import UserError

CASES = [(name, preset) for name in recipes.names() for preset in recipes.get(name).presets]


def test_the_cards_and_the_parser_need_no_torch():
    """The launcher's side has no torch: importing every card, the trainer's parser and the launch's options must not
    pull it in (nor numpy)."""
    code = ("import sys, fabfile, infra.launch, infra.plan, job.config; job.config.parse_args(['--recipe', 'speedrun-2025-05-24']); "
            "bad = [m for m in ('torch', 'numpy') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("recipe, preset", CASES)
def test_the_launcher_sizes_the_run_the_trainer_will_run(recipe, preset):
    job = Job(recipe=recipe, preset=preset)
    cfg = config.from_dict({"recipe": recipe, "preset": preset})
    assert job.run_steps() == cfg.max_steps
    assert job.train_tokens() == recipes.get(recipe).train_tokens(cfg)
    if not recipes.get(recipe).staged(cfg):  # a staged recipe's steps differ (the 2026-07-17 record's card test sums them)
        assert job.train_tokens() == cfg.max_steps * cfg.total_batch_tokens
    assert job.data == ("bundled" if preset in recipes.get(recipe).bundled_presets else "hub")
    assert job.hub == contract.HUB_SHARDS[recipes.get(recipe).data]


def test_the_records_run_comes_from_its_card():
    job = Job(recipe="speedrun-2025-05-24")
    assert job.preset == "gpt2" and (job.run_steps(), job.tokens_per_step()) == (1770, 8 * 48 * 1024)
    assert job.cfg.val_tokens == 10_485_760 and job.data_subdir == contract.HUB_SHARDS["fineweb-gpt2"].subdir
    published = recipes.get("speedrun-2025-05-24").published
    assert published.on == "gpu_8x_h100_sxm5" and published.step_seconds * 1770 == pytest.approx(181)
    assert recipes.get("gpt2").published is None  # build-nanogpt's run is priced from the GPU's throughput


@pytest.mark.parametrize("kwargs, needles", [
    (dict(recipe="speedrun-2025-05-24", preset="gpt2-xl"), ["--preset gpt2-xl", "speedrun-2025-05-24 recipe's presets are gpt2, tiny"]),
    (dict(recipe="nanogpt"), ["--recipe must be one of gpt2, speedrun, speedrun-2025-05-24"]),
    (dict(recipe="speedrun-2025-05-24", trainer_args=["--max-lr", "1e-4"]),
     ["--max-lr is a setting of the gpt2 recipe, not of speedrun-2025-05-24", "--muon-lr"]),
    (dict(recipe="speedrun-2025-05-24", trainer_args=["--init-from", "hf:x"]), ["--init-from is a setting of the gpt2 recipe"]),
    (dict(trainer_args=["--muon-lr", "0.1"]), ["--muon-lr is a setting of the speedrun-2025-05-24 recipe, not of gpt2"]),
    (dict(trainer_args=["--bogus"]), ["unrecognized arguments: --bogus"]),
    (dict(trainer_args=["--eval-every", "x"]), ["--eval-every", "'x'"]),
    (dict(trainer_args=["--max-lr", "2"]), ["--max-lr must be in (0, 1)"]),
    (dict(recipe="speedrun-2025-05-24", trainer_args=["--seq-len", "1000"]), ["multiple of 128", "use 1024"]),
    (dict(preset="gpt2", data="bundled"), [f"--data bundled makes shards of {BUNDLED_SHARD_TOKENS:,} tokens", "64 x 1024", "tiny"]),
    (dict(preset="tiny", data="bundled", trainer_args=["--micro-batch", "400"]), ["400 x 128"]),
    (dict(data="floppy"), ["--data 'floppy'"]),
    # The staged record's steps are its stages': a shorter run names the flag that fits them into it.
    (dict(recipe="speedrun", steps=50), ["--max-steps 50 is not --scheduled-steps 1380 + --extension-steps 10",
                                         "or --scheduled-steps 40 to fit the stages into 50 steps"]),
])
def test_the_laptop_refuses_what_the_trainer_would(kwargs, needles):
    with pytest.raises(UserError) as e:
        Job(**kwargs)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_a_batch_that_does_not_divide_among_the_ranks_is_refused_for_that_many_gpus():
    job = Job(recipe="speedrun-2025-05-24")
    job.check_world([8])
    job.check_world([4, 4])  # two boxes of four
    with pytest.raises(UserError, match=r"on 3 ranks: --total-batch-tokens 393216 is not divisible by .* 1 x 49152 x 3"):
        job.check_world([3])
    with pytest.raises(UserError, match="on 16 ranks"):
        Job(recipe="speedrun-2025-05-24", nproc=8).check_world([1, 1])  # --nproc, not the GPUs, decides


def test_the_guard_settings_the_box_refuses_are_refused_here():
    with pytest.raises(UserError, match="--max-hours must be positive"):
        CloudOptions(max_hours=0)
    with pytest.raises(UserError, match="--max-hours must be positive"):
        from_flags(LaunchOptions, {"host": "u@h", "max_hours": "0"})


def test_every_launch_flag_is_defined_once_and_parsed_by_its_field():
    signature = fab_signature(LaunchOptions)
    names = list(signature.parameters)[1:]
    assert names == list(fab_help(LaunchOptions)) and len(names) == len(set(names))
    for needed in ("host", "hosts", "recipe", "preset", "train_args", "steps", "type", "guard_poll", "build_arg", "dry_run", "key"):
        assert needed in names
    # Switches are switches, the rest take a value.
    assert signature.parameters["dry_run"].default is False and signature.parameters["steps"].default is None
    opts = from_flags(LaunchOptions, {"hosts": "u@a, u@b", "steps": "5", "build_arg": "A=1 B='two words'", "train_args": "--eval-every 3",
                                      "type": "gpu_1x_a10", "guard_poll": "2.5", "port": "2222", "recipe": "speedrun-2025-05-24", "preset": "tiny",
                                      "dry_run": True})
    assert opts.hosts == ["u@a", "u@b"] and opts.job.steps == 5 and opts.build_args == {"A": "1", "B": "two words"}
    assert opts.job.trainer_args == ["--eval-every", "3"] and opts.job.cfg.eval_every == 3 and opts.job.cfg.max_steps == 5
    assert (opts.cloud.type_name, opts.cloud.guard_poll_seconds, opts.ssh.port, opts.dry_run) == ("gpu_1x_a10", 2.5, 2222, True)
    # Nothing given: every field's own default.
    assert from_flags(LaunchOptions, {}) == LaunchOptions()
    with pytest.raises(UserError, match="not both"):
        from_flags(LaunchOptions, {"host": "u@a", "hosts": "u@b"})


def test_the_fab_task_takes_its_flags_from_the_options():
    import fabfile

    assert inspect.signature(fabfile.launch.body) == fab_signature(LaunchOptions)
    assert fabfile.launch.help == fab_help(LaunchOptions)


@pytest.mark.parametrize("flags, needle", [
    (["--recipe", "speedrun-2025-05-24", "--preset", "gpt2-xl"], "--preset gpt2-xl"),
    (["--data", "bundled"], "--data bundled"),
    (["--recipe", "speedrun-2025-05-24", "--train-args", "--max-lr 1e-4"], "--max-lr is a setting of the gpt2 recipe"),
    (["--max-hours", "0", "--terminate-when-done"], "--max-hours must be positive"),
])
def test_fab_launch_refuses_before_connecting(flags, needle, tmp_path):
    """The host is an address where nothing listens: the refusal comes first, so nothing was ever contacted."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: a connection would be refused
        for dry in ([], ["--dry-run"]):
            proc = subprocess.run([str(ROOT / ".venv" / "bin" / "fab"), "launch", "--host", "ubuntu@127.0.0.1", "--port", str(port),
                                   "--known-hosts", str(tmp_path / "kh"), *flags, *dry], cwd=ROOT, capture_output=True, text=True,
                                  timeout=120)
            assert proc.returncode == 2
            assert_one_line_error(proc, needle)


def test_the_dry_run_and_the_launch_are_one_list_of_steps():
    """Every step of the launch has the plan the dry run prints for it, or only looks (preflight), so a step cannot be
    added to one mode and not the other."""
    from infra import launch, plan

    names = [s.name for s in launch.STEPS]
    assert len(names) == len(set(names)) and names[0] == "preflight" and names[-2:] == ["trainer", "exit watch"]
    for step in launch.STEPS:
        assert callable(step.do) and (step.plan is None) == (step.name == "preflight"), step.name
        assert step.plan is None or step.plan.__module__ == plan.__name__, step.name
