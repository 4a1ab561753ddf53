"""The benchmark runs end to end on the CPU and says what it measured in lines a reader (or a script) can parse.

Timings are never asserted: only that every figure is there, well-formed and consistent with the JSON.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, assert_one_line_error, env, one, run_cli, script_module

BENCH = str(ROOT / "scripts" / "bench_train.py")
SUMMARY = str(ROOT / "scripts" / "bench_summary.py")
LOSS = str(ROOT / "scripts" / "bench_loss.py")
# The tiny preset shrunk further, so a quick run takes seconds on one core.
SMALL = ["--preset", "tiny", "--device", "cpu", "--quick", "--micro-batch", "4", "--seq-len", "32",
         "--set", "n_layer=2", "--set", "n_head=2", "--set", "n_embd=64"]
NUM = r"[\d,]+(?:\.\d+)?"
ROW = re.compile(rf"^(\(a\) [\w -]+?|\(b\) plain eager)\s+(\d+)\s+(\d+)\s+({NUM})\s+({NUM})\s+({NUM})%\s+({NUM})\s+\S")


def table(stdout: str) -> dict[str, tuple]:
    rows = {}
    for line in stdout.splitlines():
        if m := ROW.match(line):
            rows[m.group(1).strip()] = tuple(float(g.replace(",", "")) for g in m.groups()[1:])
    return rows


@pytest.mark.slow  # benchmark runs that train
def test_quick_cpu_run_reports_every_figure(tmp_path):
    out = tmp_path / "r.json"
    proc = run_cli(BENCH, *SMALL, "--variant", "ce:ce_chunk_tokens=48", "--variant", "mb2:micro_batch=2", "--json", out, check=True)
    text = proc.stdout
    rows = table(text)
    assert set(rows) == {"(a) trainer", "(a) real data", "(a) ce", "(a) mb2", "(b) plain eager"}, text
    assert rows["(a) mb2"][:2] == (2, 4) and rows["(a) trainer"][:2] == (4, 2)  # same tokens per step, twice the accumulation
    for _, _, ms, tok_s, mfu, mem in rows.values():
        assert ms > 0 and tok_s > 0 and mfu > 0 and mem > 0
    assert float(one(r"^ratio a/b: ([\d.]+)x$", text).group(1)) > 0
    one(r"^real data vs synthetic: [+-][\d.]+% tok/s", text)
    one(r"^matmul peak\s+[\d.]+ TFLOP/s \(float32 512\^3 GEMM, measured, median; the higher of [\d.]+ before and [\d.]+ after "
        r"the runs\)", text)
    one(r"^FLOPs/token\s+[\d.]+ GFLOP = 6N [\d.]+ \(N=[\d.]+M\) \+ attention 12\*L\*d\*T [\d.]+$", text)
    for name in ("a", "ce", "mb2"):  # same seed, same rows: every optimised run follows the plain trajectory
        one(rf"^numerics {name} vs b: max rel loss diff [\d.e+-]+ over 4 steps \(tolerance 1e-04\): ok$", text)
    assert int(one(r"^recompiles after warm-up: (\d+) \(frames compiled in warm-up: \d+\)$", text).group(1)) == 0
    one(r"^eval: val [\d.]+ s \(2 batches\), sampling [\d.]+ s \(4 x 4 tokens\), HellaSwag [\d.]+ ms/example", text)
    one(r"^eval share: [\d.]+% of wall time", text)
    one(r"^checkpoint: [\d,]+ MiB, training held [\d.]+ s .* written in [\d.]+ s in the background", text)

    res = json.loads(out.read_text())
    assert res["flops"]["per_token"] == res["flops"]["6N"] + res["flops"]["attention"]
    # The peak is measured before and after the runs; every MFU is taken against the higher (the lower would flatter it).
    assert len(res["peak_flops_measured"]) == 2 and res["peak_flops"] == max(res["peak_flops_measured"])
    for r in res["runs"].values():
        assert r["mfu"] == pytest.approx(res["flops"]["per_token"] * r["tok_s"] / res["peak_flops"])
    assert set(res["runs"]) == {"a", "real", "ce", "mb2", "b"}
    for name, r in res["runs"].items():
        assert len(r["losses"]) == 4 and r["steps"] == 3 and r["tokens_per_step"] == 256, name
        assert r["tok_s"] == pytest.approx(256 / (r["ms_per_step"] / 1000))
    assert res["runs"]["mb2"]["settings"] == {"micro_batch": 2}
    assert res["ratio_a_b"] == pytest.approx(res["runs"]["a"]["tok_s"] / res["runs"]["b"]["tok_s"])
    assert res["eval"]["recompiles_after_warmup"] == 0 and res["ckpt"]["bytes"] > 0
    assert all(n["ok"] for n in res["numerics"].values())


# Variants alone checked against an earlier run's (b): gpu_bench.sh's candidates, tuned and variants stages (the test
# of every stage below). Without that earlier run:
@pytest.mark.slow  # benchmark runs that train
def test_variants_alone_without_a_baseline_say_so(tmp_path):
    text = run_cli(BENCH, *SMALL, "--runs", "", "--variant", "ce:ce_chunk_tokens=40", "--compare-json", tmp_path / "nope.json",
                   check=True).stdout
    assert set(table(text)) == {"(a) ce"}
    one(r"^numerics: no baseline to compare with", text)


@pytest.mark.slow  # benchmark runs that train
def test_a_failing_run_costs_only_its_own_figures(tmp_path):
    # (a) asks for a CUDA-only attention kernel on the CPU: it fails; the variant, (b) and the numerics still run,
    # the JSON is still written, and the exit status says that something failed.
    out = tmp_path / "r.json"
    proc = run_cli(BENCH, *SMALL, "--runs", "a,eval,b", "--set", "sdpa_backend=cudnn", "--variant", "flash:sdpa_backend=flash",
                   "--json", out)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == f"error: failed: a (every other figure is above and in {out})"
    one(r"^\(a\) trainer\s+failed: UserError: --sdpa-backend cudnn needs a CUDA GPU", proc.stdout)
    assert set(table(proc.stdout)) == {"(a) flash", "(b) plain eager"}
    one(r"^numerics flash vs b: .* ok$", proc.stdout)
    res = json.loads(out.read_text())
    assert "needs a CUDA GPU" in res["runs"]["a"]["error"] and "eval" not in res and "ratio_a_b" not in res
    assert res["runs"]["flash"]["tok_s"] > 0 and res["runs"]["b"]["tok_s"] > 0
    assert res["set"]["sdpa_backend"] == "cudnn" and res["runs"]["flash"]["settings"] == {"sdpa_backend": "flash"}

    # The summary over it and a stage that wrote nothing: the failure and the gap are rows, not a crash; with no (a)
    # to compare with it still names the fastest run whose numerics held, and the settings that make it the default.
    text = run_cli(SUMMARY, out, tmp_path / "tuned.json", check=True).stdout
    one(r"^summary: tiny on CPU .*; no \(a\) in the first file to compare with", text)
    one(r"^r\s+\(a\) trainer\s+failed: UserError: --sdpa-backend cudnn needs a CUDA GPU", text)
    one(r"^r\s+\(a\) flash\s+[\d.]+\s+[\d,]+\s+-\s+[\d.]+%\s+[\d.]+\s+[\d.e+-]+ ok  n_layer=2, n_head=2, n_embd=64, sdpa_backend=flash$", text)
    one(r"^tuned\s+no results \(tuned.json is missing: the stage failed, timed out or was skipped\)$", text)
    assert one(r"^fastest with numerics ok: r \(a\) flash, ([\d,]+) tok/s$", text).group(1) == f"{res['runs']['flash']['tok_s']:,.0f}"
    one(r"^its settings over the preset: n_layer=2, n_head=2, n_embd=64, sdpa_backend=flash$", text)


@pytest.mark.parametrize("args, needle", [
    (["--variant", "ce"], "expected NAME:key=value"),
    (["--variant", "x:no_such_field=1"], "not key=value with a TrainConfig field"),
    (["--variant", "x:micro_batch=many"], "micro_batch expects int"),
    (["--variant", "x:micro_batch=3"], "not divisible"),
    (["--runs", "a,zzz"], "unknown run 'zzz'"),
])
def test_mistakes_are_one_clear_line(args, needle):
    assert_one_line_error(run_cli(BENCH, *SMALL, *args), needle)


@pytest.mark.parametrize("args, needle", [
    (["--chunks", "0,many"], "expected comma-separated whole numbers"),
    (["--chunks", "0,-8"], "chunk sizes are 0 (full logits) or a positive number of rows"),
    (["--steps", "0"], "argument --steps: must be at least 1"),
    (["--rows", "0"], "argument --rows: must be at least 1"),
])
def test_loss_bench_mistakes_are_one_clear_line(args, needle):
    assert_one_line_error(run_cli(LOSS, "--device", "cpu", *args), needle)


@pytest.mark.parametrize("kernel, category", [
    # CUDA kernel names as the profiler reports them on an H100 (cuBLAS, cuDNN, FlashAttention-2, Inductor, NCCL)
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_NNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off", "matmul"),
    ("triton_tem_fused_addmm_gelu_view_3", "matmul"),  # an Inductor GEMM template with the GELU fused in
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0", "attention"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128, 128>>", "attention"),
    ("triton_red_fused__log_softmax__to_copy_nll_loss_forward_5", "loss"),
    ("triton_per_fused__to_copy_add_native_layer_norm_native_layer_norm_backward_12", "layer norm"),
    ("triton_poi_fused__to_copy_add_mul_tanh_view_8", "gelu"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("Memcpy HtoD (Pinned -> Device)", "copy/fill"),
    ("triton_poi_fused_embedding_dense_backward_1", "embedding"),
])
def test_profile_puts_gpu_kernels_in_their_category(kernel, category):
    assert script_module("benchlib").kernel_category(kernel) == category


def test_summary_mistakes_are_one_clear_line(tmp_path):
    assert_one_line_error(run_cli(SUMMARY, tmp_path / "main.json"), "none of", "exists: run scripts/bench_train.py --json FILE")
    (tmp_path / "main.json").write_text('{"runs": ')
    assert_one_line_error(run_cli(SUMMARY, tmp_path / "main.json"), "is not a bench_train.py JSON (JSONDecodeError)")
    (tmp_path / "main.json").write_text('[1, 2]')
    assert_one_line_error(run_cli(SUMMARY, tmp_path / "main.json"), "is not a bench_train.py JSON (no runs in it)")


def bench_json(path, tok_s: dict, numerics_ok: dict, sets: dict | None = None):
    runs = {name: {"tok_s": t, "ms_per_step": 1.0, "mfu": 0.5, "peak_mem_gib": 1.0,
                   "settings": {"compile_mode": name} if name not in ("a", "b") else {}} for name, t in tok_s.items()}
    numerics = {name: {"max_rel_diff": 1e-6 if ok else 0.5, "ok": ok} for name, ok in numerics_ok.items()}
    path.write_text(json.dumps({"preset": "gpt2", "set": sets or {}, "runs": runs, "numerics": numerics}))
    return path


def test_winner_sets_name_only_a_real_gain_whose_numerics_held(tmp_path):
    main = bench_json(tmp_path / "main.json", {"a": 100.0, "b": 80.0}, {"a": True})
    cands = bench_json(tmp_path / "candidates.json", {"a": 100.5, "res16": 104.0, "bad": 130.0},
                       {"a": True, "res16": True, "bad": False}, sets={"sdpa_backend": "flash"})
    cli = [SUMMARY, main, cands, "--winner-sets"]
    # res16 is the fastest that held (bad's losses diverged; b is the baseline, not a candidate), 4 % over (a).
    assert run_cli(*cli, check=True).stdout.strip() == "--set sdpa_backend=flash --set compile_mode=res16"
    bench_json(cands, {"a": 100.5, "res16": 100.9}, {"a": True, "res16": True})  # within the 1 % of noise
    assert run_cli(*cli, check=True).stdout.strip() == ""
    assert run_cli(SUMMARY, main, "--winner-sets", check=True).stdout.strip() == ""  # the defaults are the fastest


@pytest.mark.slow  # benchmark runs that train
def test_a_winner_without_ddp_is_measured_again_without_ddp(tmp_path):
    # gpu_bench's variants stage runs noddp:ddp=0; when it wins, confirm passes its settings back as --set, and
    # bench_train.py takes ddp there as it does in --variant (it once refused it, failing the confirm stage).
    main = bench_json(tmp_path / "main.json", {"a": 100.0, "b": 80.0}, {"a": True})
    variants = tmp_path / "variants.json"
    variants.write_text(json.dumps({"set": {"n_layer": 2}, "numerics": {"noddp": {"max_rel_diff": 0.0, "ok": True}},
                                    "runs": {"noddp": {"tok_s": 110.0, "ms_per_step": 1.0, "mfu": 0.5, "peak_mem_gib": 1.0,
                                                       "settings": {"ddp": 0}}}}))
    win = run_cli(SUMMARY, main, variants, "--winner-sets", check=True).stdout.split()
    assert win == ["--set", "n_layer=2", "--set", "ddp=0"]
    out = tmp_path / "confirm.json"
    text = run_cli(BENCH, *SMALL, *win[2:], "--runs", "a", "--json", out, check=True).stdout
    one(r"^\(a\) trainer .* no DDP, ", text)
    assert json.loads(out.read_text())["set"]["ddp"] == 0
    text = run_cli(BENCH, *SMALL, "--set", "ddp=1", "--runs", "a", check=True).stdout
    one(r"^\(a\) trainer .* DDP x1, ", text)


def test_trainer_and_bench_import_without_the_launcher_or_datasets_packages():
    """The GPU box's Python has torch, numpy and tiktoken but not datasets, fabric, paramiko or boto3."""
    code = f"""
import importlib.abc, runpy, sys
BLOCKED = {{"datasets", "fabric", "paramiko", "boto3", "botocore", "invoke"}}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import job.train, job.model, job.data, job.checkpoint, job.config, job.hellaswag
runpy.run_path({BENCH!r}, run_name="not_main")
print("imports ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "imports ok" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_compiled_eval_and_sampling_do_not_recompile_after_warm_up():
    text = run_cli(BENCH, *SMALL, "--runs", "eval", "--compile", "on", "--set", "ce_chunk_tokens=48", check=True, timeout=600).stdout
    m = one(r"^recompiles after warm-up: (\d+) \(frames compiled in warm-up: (\d+)\)$", text)
    assert int(m.group(1)) == 0 and int(m.group(2)) >= 1  # the eval-mode graph is compiled once, in warm-up


@pytest.mark.slow
def test_gpu_bench_script_runs_every_stage_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    # Micro-batches of 2 x 16 rows: at GPT-2's vocabulary the output layer's bf16 matmuls take most of a CPU's step,
    # in proportion to the rows. The candidates' chunking (CE_CHUNK) shrinks with them: several chunks, a short last one.
    e = env(OUT=out, DEVICE="cpu", PRESET="tiny", PYTHON=sys.executable, STAGES="main loss candidates tuned variants confirm autotune",
            BENCH_ARGS="--micro-batch 2 --seq-len 16 --set n_layer=2 --set n_head=2 --set n_embd=16", CE_CHUNK=12)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh")], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stages = (out / "stages.txt").read_text().splitlines()
    names = ["main", "candidates", "tuned", "variants", "autotune"]
    order = ["env", "main", "loss", "candidates", "tuned", "variants", "confirm", "autotune"]
    assert [s.split(":")[0] for s in stages] == [f"== {n}" for n in order], stages
    # confirm re-measures the fastest run before it if that run beat main's (a) by 1 % (CPU timings: either way).
    win = run_cli(SUMMARY, *[out / f"{n}.json" for n in names[:4]], "--winner-sets", check=True).stdout.split()
    if win:
        confirm = json.loads((out / "confirm.json").read_text())
        assert set(confirm["runs"]) == {"a", "b"} and confirm["numerics"]["a"]["ok"]
        assert {f"{k}={v}" for k, v in confirm["set"].items()} == {w for w in win if w != "--set"}
        names.insert(4, "confirm")
    else:
        assert "== confirm: ok (nothing to confirm: no run beat main's (a) by 1 % or more" in proc.stdout
        assert not (out / "confirm.json").exists()
    assert all(": ok (" in s for s in stages)
    for name in names:
        assert json.loads((out / f"{name}.json").read_text())["runs"]
    # Every variant is checked against main's (b); variants' flash run puts the flash kernel first.
    expected = {"candidates": {"full", "ce12"}, "tuned": {"tuned"},
                "variants": {"flash", "fp32res", "mb4", "noddp"}}
    for name, variants in expected.items():
        res = json.loads((out / f"{name}.json").read_text())
        assert set(res["runs"]) == variants  # the variants alone: no (a) or (b) of their own
        numerics = res["numerics"]
        assert set(numerics) == variants and all(n["ok"] for n in numerics.values()), (name, numerics)
    assert "recompiles after warm-up: 0" in (out / "main.log").read_text()
    # The profiled stages say where (a)'s time went and which attention kernel ran.
    profile = json.loads((out / "main.json").read_text())["runs"]["a"]["profile"]
    assert profile["categories_ms"]["matmul"] > 0 and profile["busy_ms_per_step"] > 0
    # record_function ranges are not kernels: DDP's forward range (its whole forward) once counted as 88 ms of an H100's
    # 282 ms step, and its self time here on the CPU placed it among the top operators.
    assert not [t for t in profile["top"] if t["name"].startswith("DistributedDataParallel")], profile["top"]
    assert any("flash_attention" in k for k in json.loads((out / "variants.json").read_text())["runs"]["flash"]["profile"]["attention_kernels"])
    # The loss variants are what they say: full logits, and in chunks of 12 rows (main's (a) runs the preset's own).
    losses = {r: v["notes"] for r, v in json.loads((out / "candidates.json").read_text())["runs"].items()}
    assert "loss full logits" in losses["full"] and "loss chunked 12" in losses["ce12"], losses
    assert "loss chunked 1024" in json.loads((out / "main.json").read_text())["runs"]["a"]["notes"]
    assert "profile (a) trainer:" in (out / "main.log").read_text()
    # The loss stage: full logits and both chunkings, the same loss and gradients, the loss kernels timed apart.
    loss = json.loads((out / "loss.json").read_text())
    assert [r["chunk"] for r in loss["runs"]] == [0, 48, 65536] and loss["rows"] == 200
    for r in loss["runs"]:
        assert r["loss_ms"] > 0 and r["matmul_ms"] > 0 and r["rel_loss"] < 1e-3 and r["rel_grad_h"] < 1e-2, r
        assert r["loss_kernels"] and abs(sum(k["ms"] for k in r["loss_kernels"]) - r["loss_ms"]) < 1e-6, r
    assert json.loads((out / "main.json").read_text())["eval"]["recompiles_after_warmup"] == 0
    # The closing summary: every stage's runs in one table, tok/s against main's (a), the fastest named.
    summary = (out / "summary.txt").read_text()
    assert summary in proc.stdout
    ref = json.loads((out / "main.json").read_text())["runs"]["a"]["tok_s"]
    best = (0, "")
    for name in names:
        res = json.loads((out / f"{name}.json").read_text())
        for run, r in res["runs"].items():
            label = {"a": "trainer", "real": "real data", "b": "plain eager"}.get(run, run)
            m = one(rf"^{name}\s+\([ab]\) {label}\s+[\d.]+\s+([\d,]+)\s+([+-][\d.]+)%", summary)
            assert m.group(1) == f"{r['tok_s']:,.0f}" and m.group(2) == f"{(r['tok_s'] / ref - 1) * 100:+.1f}", (name, run, summary)
            if run not in ("b", "real") and r["tok_s"] > best[0]:
                best = (r["tok_s"], f"{name} (a) {label}")
    assert one(r"^fastest with numerics ok: (.+), [\d,]+ tok/s \([+-][\d.]+% vs \(a\)\)$", summary).group(1) == best[1]


def test_gpu_bench_script_names_an_unknown_stage(tmp_path):
    e = env(OUT=tmp_path / "out", DEVICE="cpu", PRESET="tiny", PYTHON=sys.executable, STAGES="mian")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh")], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "== mian: unknown stage (STAGES takes main loss candidates tuned variants confirm autotune)" in proc.stdout
    assert os.access(ROOT / "scripts" / "gpu_bench.sh", os.X_OK)


def test_gpu_bench_script_never_reports_an_earlier_runs_json(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "main.json").write_text(json.dumps({"preset": "tiny", "runs": {"a": {"tok_s": 1e9, "ms_per_step": 1, "mfu": 1, "peak_mem_gib": 1}}}))
    e = env(OUT=out, DEVICE="cpu", PRESET="tiny", PYTHON=sys.executable, STAGES="main", BENCH_ARGS="--runs zzz")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh")], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "== main: FAILED (rc 2)" in proc.stdout, proc.stdout
    assert not (out / "main.json").exists() and "1,000,000,000" not in proc.stdout
    assert f"error: none of {out}/main.json exists" in proc.stderr


# --- scripts/gpu_proof.sh ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gpu_proof_runs_every_stage_in_its_cpu_mode_and_says_what_it_skipped(tmp_path):
    """The prepared device check, in its CPU mode: every recipe's trainer runs on synthetic documents and lands in the
    summary; the records' stages say in one line why they did not run (their code is never in this repository)."""
    out = tmp_path / "proof"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_proof.sh")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env(DEVICE="cpu", OUT=out, STEPS=4, PYTHON=sys.executable, RECORD_2025="", RECORD_2026=""))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from job import recipes

    stages = (out / "stages.txt").read_text().splitlines()
    assert [s.split(":")[0] for s in stages] == ["== env", "== record-2025", "== record-2026",
                                                 *[f"== train-{r}" for r in recipes.names()]], stages
    assert stages[1].startswith("== record-2025: skipped (no RECORD_2025") and stages[2].startswith("== record-2026: skipped (no RECORD_2026")
    assert all(": ok (" in s for s in stages[:1] + stages[3:]), stages
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["recipes"]) == sorted(recipes.names())
    assert all(r["step_ms_median"] > 0 and r["warm_first_step_s"] is None for r in summary["recipes"].values())  # eager: no compile
    staged = json.loads((out / "train-speedrun.json").read_text())["cold"]["tokens_per_step"]
    assert staged == sorted(staged) and len(set(staged)) == 3  # the four steps cross the record's three batch sizes
    env_info = json.loads((out / "env.json").read_text())
    assert env_info["gpu"] is None and env_info["torch"].startswith("2.")


@pytest.mark.parametrize("args, needle", [
    (["--steps", "3"], "--steps"),
    (["--record-2025", "/nonexistent/log.txt"], "--record-2025 /nonexistent/log.txt: no such file"),
    (["--device", "tpu"], "--device"),
])
def test_gpu_proof_bad_input_is_one_line(tmp_path, args, needle):
    proc = run_cli(str(ROOT / "scripts" / "gpu_proof.py"), "--out", tmp_path / "p", *args)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("text", ["[1, 2]", '{"runs": [1]}', '{"runs": {"b": 5}}', '{"runs": {"b": {"losses": "low"}}}', "{not json"])
def test_an_earlier_results_file_that_is_not_one_is_not_compared(text, tmp_path, capsys):
    res = {"preset": "tiny", "T": 16, "tokens_per_step": 64, "seed": 0}
    path = tmp_path / "earlier.json"
    path.write_text(text)
    assert script_module("benchlib").earlier_baseline(str(path), res) is None
    assert "numerics: " in capsys.readouterr().out
    path.write_text(json.dumps({**res, "runs": {"b": {"losses": [3.0, 2.5]}}}))
    assert script_module("benchlib").earlier_baseline(str(path), res) == [3.0, 2.5]
