"""What `fab launch` decides about data and price before it touches a box: the recipe's corpus and its directory,
the download sized to the run, the commands run on the box, the price line's step count and step time, where the
laptop's Hugging Face token comes from, and how the box's `error:` line reaches the user once."""

from __future__ import annotations

import io

import pytest

from infra import cloud
from infra.cloud import price_basis
from infra.container import Job, _Tail, hub_flags
from infra.credentials import hf_token
from job import contract
from job.errors import UserError


def test_each_recipe_downloads_its_corpus_sized_to_the_run_and_the_tokenizing_path_stays_by_flag():
    gpt2 = Job(preset="gpt2")
    assert gpt2.data == "hub" and gpt2.data_subdir == "finewebedu10B-gpt2"
    assert gpt2.prepare_command() == f"python -m job.prepare finewebedu-gpt2 --out /persistent/finewebedu10B-gpt2 --train-tokens {19073 * 2**19}"
    cmd = gpt2.trainer_command()
    assert cmd[cmd.index("--recipe") + 1] == "gpt2" and cmd[cmd.index("--data-dir") + 1] == "/persistent/finewebedu10B-gpt2"

    speedrun = Job(preset="gpt2", recipe="speedrun-2025-05-24")
    assert speedrun.run_steps() == 1770 and speedrun.train_tokens() == 1770 * 8 * 48 * 1024
    assert speedrun.prepare_command().startswith("python -m job.prepare fineweb-gpt2 --out /persistent/fineweb10B-gpt2 ")
    assert "--recipe speedrun-2025-05-24" in " ".join(speedrun.trainer_command())
    # No --max-steps: the trainer reads the preset's from the same card, the run that was priced and downloaded for.
    assert "--max-steps" not in cmd and "--max-steps" not in speedrun.trainer_command()
    assert "--max-steps 50" in " ".join(Job(recipe="speedrun-2025-05-24", steps=50).trainer_command())

    slow = Job(preset="gpt2", data="tokenize")
    assert slow.prepare_command() == f"python -m job.prepare fineweb-edu --out {contract.DATA_DIR}"  # build-nanogpt's directory
    assert Job(recipe="speedrun-2025-05-24", data="tokenize").prepare_command() == "python -m job.prepare fineweb --out /persistent/fineweb10B"

    tiny = Job(preset="tiny")  # the bundled corpus unless asked otherwise
    assert tiny.data == "bundled" and tiny.data_subdir == "tinyshakespeare"
    tiny_hub = Job(preset="tiny", data="hub", steps=50)
    assert tiny_hub.prepare_command().endswith(f"--train-tokens {50 * 1024}")


@pytest.mark.parametrize("kwargs, needle", [
    ({"recipe": "nope"}, "--recipe must be one of gpt2, speedrun, speedrun-2025-05-24, got 'nope'"),
    ({"data": "web"}, "--data 'web': choose one of hub, tokenize, bundled"),
    ({"preset": "huge"}, "--preset huge: the gpt2 recipe's presets are gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny"),
])
def test_bad_choices_are_refused_before_anything_happens(kwargs, needle):
    with pytest.raises(UserError, match=needle):
        Job(**kwargs)


def test_the_price_uses_the_recipes_steps_and_its_published_step_time():
    h100 = cloud.Plan("gpu_8x_h100_sxm5", "us-east-1", "k", None, 2392, 8)
    job = Job(recipe="speedrun-2025-05-24")
    seconds, basis = price_basis(job, h100.type_name, None)
    assert seconds == pytest.approx(181 / 1770) and "181 s for 1770 steps on 8xH100" in basis
    line = cloud.cost_line(h100, job.run_steps(), seconds, basis=basis, tokens_per_step=job.tokens_per_step())
    assert "1770 steps x 0.10 s (modded-nanogpt's published record" in line and "about $" in line
    assert price_basis(job, h100.type_name, 0.2) == (0.2, None)  # --step-seconds wins
    a100 = cloud.Plan("gpu_8x_a100", "us-east-1", "k", None, 1200, 8)
    assert price_basis(job, a100.type_name, None) == (None, None)
    assumed = cloud.cost_line(a100, job.run_steps(), None, tokens_per_step=job.tokens_per_step())
    assert f"1770 steps x {cloud.assumed_step_seconds('gpu_8x_a100', 8, 8 * 48 * 1024):.2f} s (assumed)" in assumed
    assert "19073 steps" in cloud.cost_line(h100, Job().run_steps())


def test_the_laptops_token_is_found_where_huggingface_hub_looks(tmp_path, monkeypatch):
    for k in ("HF_TOKEN", "HF_TOKEN_PATH", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hf_token() is None
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)
    (tmp_path / ".cache" / "huggingface" / "token").write_text("hf_file\n")
    assert hf_token() == "hf_file"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hf_token() is None
    (tmp_path / "t").write_text("hf_path")
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "t"))
    assert hf_token() == "hf_path"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert hf_token() == "hf_env"


@pytest.mark.parametrize("kind, needle", [
    ("dir", "is a directory"), ("binary", "binary bytes"), ("accent", r"not ASCII \(at position 7\)"), ("lines", "more than one word"),
])
def test_a_token_file_that_cannot_be_sent_is_one_line(tmp_path, monkeypatch, kind, needle):
    from job.errors import UserError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    path = tmp_path / "token"
    if kind == "dir":
        path.mkdir()
    else:
        path.write_bytes({"binary": b"\xff\xfe\x00hf", "accent": "hf_caf\u00e9".encode(), "lines": b"hf_a\nhf_b\n"}[kind])
    monkeypatch.setenv("HF_TOKEN_PATH", str(path))
    with pytest.raises(UserError, match=needle) as e:
        hf_token()
    assert f"HF_TOKEN_PATH={path}" in str(e.value) and "hf_caf" not in str(e.value)
    monkeypatch.setenv("HF_TOKEN", "hf_caf\u00e9")
    with pytest.raises(UserError, match="HF_TOKEN holds a character that is not ASCII"):
        hf_token()


def test_the_token_reaches_the_container_as_a_read_only_file_only(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    flags = hub_flags("/home/u/.config/nanogpt/hf-token")
    assert flags == " -v /home/u/.config/nanogpt/hf-token:/run/nanogpt/hf-token:ro -e HF_TOKEN_PATH=/run/nanogpt/hf-token"
    assert hub_flags(None) == ""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/x y")
    assert hub_flags(None) == " -e 'HF_ENDPOINT=http://127.0.0.1:9/x y'"


def test_the_boxs_error_line_is_held_back_to_be_said_once():
    out = io.StringIO()
    tail = _Tail(out)
    tail.write("downloading\n")
    tail.write("error: the hub refused the token\n")
    assert out.getvalue() == "downloading\n" and tail.last_error() == "the hub refused the token"
    tail.write("more output\n")  # not the last word after all: passed on in order
    assert out.getvalue() == "downloading\nerror: the hub refused the token\nmore output\n" and tail.last_error() == ""
