"""The 2026-07-17 record's optimizer (job/speedrun_2026_07_17/): Polar Express, NorMuon's update with its kept
mantissa, Adam on odd steps, the embedding tied to the output layer until untied, and the same steps on two gloo
ranks as in one process. scripts/speedrun_2026_07_17_check_optim.py holds it to the record's own code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import script_module
from job.speedrun_2026_07_17 import param_table
from job.speedrun_2026_07_17.normuon import NorMuonAndAdam, cautious_update_
from job.speedrun_2026_07_17.polar_express import ba_plus_caa, polar_express, xtx, xxt
from job.speedrun_2026_07_17.schedule import TrainingSchedule

# ---- Polar Express ------------------------------------------------------------------------------------------------


def orthogonalised(g: torch.Tensor, split: bool = False) -> torch.Tensor:
    """Polar Express of g with no momentum (a zero buffer and momentum 0: the direction is g itself)."""
    return polar_express(g.clone(), torch.zeros_like(g), torch.tensor(0.0), split=split).float()


@pytest.mark.parametrize(("shape", "split"), [((64, 256), False), ((256, 64), False), ((2, 300, 100), True), ((3, 100, 300), False)])
def test_polar_express_gives_a_nearly_orthogonal_matrix_with_the_gradients_singular_vectors(shape, split):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    X = orthogonalised(g, split)
    assert X.dtype == torch.float32 and X.shape == g.shape
    s = torch.linalg.svdvals(X)
    # Five iterations in bf16 leave every singular value near 1, not at 1 (the polynomials trade exactness for speed).
    assert 0.8 < s.min() and s.max() < 1.2, (s.min(), s.max())
    U, _, Vh = torch.linalg.svd(g, full_matrices=False)
    polar = U @ Vh  # the nearest semi-orthogonal matrix
    cosine = (X * polar).sum((-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cosine > 0.99).all(), cosine


def test_polar_express_of_a_badly_conditioned_square_matrix_still_lifts_its_small_singular_values():
    gen = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(96, 96, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(96, 96, generator=gen))
    g = U @ torch.diag(torch.logspace(0, -2, 96)) @ V.T  # singular values from 1 down to 0.01
    s = torch.linalg.svdvals(orthogonalised(g))
    assert 0.8 < s.min() and s.max() < 1.2, (s.min(), s.max())


def test_polar_express_takes_nesterov_momentum_first():
    gen = torch.Generator().manual_seed(2)
    g, buf = torch.randn(32, 48, generator=gen), torch.randn(32, 48, generator=gen)
    grad, new_buf = g.clone(), buf.clone()
    X = polar_express(grad, new_buf, torch.tensor(0.9)).float()
    torch.testing.assert_close(new_buf, 0.9 * buf + 0.1 * g)  # the buffer: an exponential average of gradients
    torch.testing.assert_close(grad, 0.9 * new_buf + 0.1 * g)  # the direction: a step further along it (Nesterov)
    direction = orthogonalised(0.9 * new_buf + 0.1 * g)
    assert (X - direction).abs().max() < 2e-2  # the same direction, up to bf16's rounding of what went in


def test_the_products_equal_their_definitions():
    """On values whose products and sums bf16 holds exactly, the helpers give exactly A A^T, A^T A and
    alpha A A + beta A, batched or not."""
    gen = torch.Generator().manual_seed(3)
    X = torch.randint(-1, 2, (2, 16, 40), generator=gen).bfloat16() / 2  # entries -1/2, 0, 1/2: sums of quarters
    exact = X.double()
    assert torch.equal(xxt(X, torch.empty(2, 16, 16, dtype=torch.bfloat16)).double(), exact @ exact.mT)
    assert torch.equal(xtx(X, torch.empty(2, 40, 40, dtype=torch.bfloat16)).double(), exact.mT @ exact)
    assert torch.equal(xxt(X[0], torch.empty(16, 16, dtype=torch.bfloat16)).double(), exact[0] @ exact[0].mT)
    A = torch.randint(-3, 4, (2, 4, 4), generator=gen).bfloat16()
    A = A + A.mT  # symmetric, as the iteration's A is
    want = 0.5 * (A.double() @ A.double()) - 2.0 * A.double()
    assert torch.equal(ba_plus_caa(A, alpha=0.5, beta=-2.0, out=torch.empty_like(A)).double(), want)
    assert torch.equal(ba_plus_caa(A[1], alpha=0.5, beta=-2.0, out=torch.empty_like(A[1])).double(), want[1])


def test_the_products_of_random_matrices_are_float32_sums_rounded_to_bf16():
    X = torch.randn(3, 64, 200, generator=torch.Generator().manual_seed(4)).bfloat16()
    got = xxt(X, torch.empty(3, 64, 64, dtype=torch.bfloat16)).double()
    want = X.double() @ X.double().mT
    assert ((got - want).abs() <= want.abs() * 2**-8 + 1e-3).all()  # within bf16's rounding of the exact sum


# ---- NorMuon's update ---------------------------------------------------------------------------------------------


def split32(w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A float32 weight as the bf16 weight (its high 16 bits: truncated) and the int16 of its low 16 bits."""
    bits = w.astype(np.float32).view(np.uint32)
    high = (bits >> 16).astype(np.uint16).view(np.int16)
    low = (bits & 0xFFFF).astype(np.uint16).view(np.int16)
    return torch.from_numpy(high.copy()).view(torch.bfloat16), torch.from_numpy(low.copy())


def join32(p: torch.Tensor, mantissa: torch.Tensor) -> np.ndarray:
    high = p.view(torch.int16).numpy().view(np.uint16).astype(np.uint32)
    low = mantissa.numpy().view(np.uint16).astype(np.uint32)
    return ((high << 16) | low).view(np.float32)


def test_a_bf16_weight_and_its_mantissa_are_updated_as_one_float32_weight():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    u = rng.standard_normal((8, 16)).astype(np.float32)
    p, mantissa = split32(w)
    lr = torch.tensor(1e-3)
    cautious_update_(p, mantissa, torch.from_numpy(u).bfloat16(), torch.tensor(0.0), lr)
    u16 = torch.from_numpy(u).bfloat16().float().numpy()
    want = w - u16 * np.float32(lr.item())  # no decay: one float32 step, nothing rounded away
    assert np.array_equal(join32(p, mantissa), want)
    # The bf16 weight the model sees is the float32 one truncated to its high half.
    assert np.array_equal(p.float().numpy(), (want.view(np.uint32) & 0xFFFF0000).view(np.float32))


def test_weight_decay_is_cautious():
    """Decay only where the update pushes the weight the same way (towards zero); elsewhere the update alone."""
    w = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    u = torch.tensor([[0.5, -0.5, 0.5, -0.5]])
    p = w.clone()
    cautious_update_(p, None, u, torch.tensor(0.1), torch.tensor(0.5))  # a float32 weight: no mantissa
    torch.testing.assert_close(p, torch.tensor([[1 - 0.05 - 0.25, 1 + 0.25, -1 - 0.25, -1 + 0.05 + 0.25]]))


# ---- the optimizer ------------------------------------------------------------------------------------------------

TABLE = {
    "bank": {"optim": "normuon", "comms": "sharded", "per_matrix_lr_mul": (1.0, 2.0)},
    "lm_head": {"optim": "adam", "comms": "sharded", "adam_betas": (0.5, 0.95), "wd_mul": 0.0},
    "embed": {"optim": "adam", "comms": "sharded", "adam_betas": (0.5, 0.95), "wd_mul": 0.0},
    "gain": {"optim": "adam", "comms": "replicated", "adam_betas": (0.9, 0.99), "lr_mul": 5.0, "wd_mul": 0.0},
}
ADAM, NORMUON = dict(lr=0.01, eps=1e-10, weight_decay=0.0), dict(lr=0.02, momentum=0.9, beta2=0.9, weight_decay=0.0)


def small_params(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    head = torch.randn(8, 16, generator=gen).bfloat16()
    return {
        "bank": torch.nn.Parameter(torch.randn(2, 2, 24, 8, generator=gen).bfloat16()),
        "lm_head": torch.nn.Parameter(head.clone()),
        "embed": torch.nn.Parameter(head.T.contiguous()),
        "gain": torch.nn.Parameter(torch.randn(6, generator=gen)),
    }


def optimizer(params, table=TABLE, **kw) -> NorMuonAndAdam:
    return NorMuonAndAdam(
        params, {k: table[k] for k in params}, [k for k in ("gain", "lm_head", "embed", "bank") if k in params], ADAM, NORMUON, **kw
    )


def grads(params: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=gen).to(p.dtype) for k, p in params.items()}


def test_adam_steps_on_odd_steps_only_with_the_gradients_of_both():
    params = small_params()
    opt = optimizer(params)
    gain0, bank0 = params["gain"].detach().clone(), params["bank"].detach().clone()
    g1, g2 = grads(params, 1), grads(params, 2)
    for k, p in params.items():
        p.grad = g1[k].clone()
    opt.step(adam=False)
    assert torch.equal(params["gain"], gain0) and torch.equal(params["gain"].grad, g1["gain"])  # kept for the next step
    assert not torch.equal(params["bank"], bank0) and params["bank"].grad is None
    for k, p in params.items():
        p.grad = g2[k].clone() if p.grad is None else p.grad + g2[k]
    opt.step(adam=True)
    # Adam's first step is lr times the sign of the gradient (bias-corrected moments of one gradient), here of both.
    step = 0.01 * 5.0 * torch.sign(g1["gain"] + g2["gain"])
    torch.testing.assert_close(params["gain"].detach(), gain0 - step)
    assert all(p.grad is None for p in params.values())


def test_a_checkpoint_keeps_each_ranks_waiting_adam_gradients_and_another_world_takes_their_mean():
    """After an even step Adam's gradients wait in the parameters; the checkpoint keeps them, one dict per rank, and
    a resume on as many ranks takes each rank's own back (bit for bit), on another number their mean."""
    from job.speedrun_2026_07_17.wiring import RecordOptimizer

    params = small_params()
    record = RecordOptimizer(optimizer(params), model=None)
    assert record.state_dict()["pending_gradients"] == []
    g1 = grads(params, 1)
    for k, p in params.items():
        p.grad = g1[k].clone()
    record.optimizer.step(adam=False)
    pending = record.state_dict()["pending_gradients"]
    assert len(pending) == 1 and set(pending[0]) == {"gain", "lm_head", "embed"}
    assert torch.equal(pending[0]["gain"], g1["gain"])

    fresh = small_params()
    resumed = RecordOptimizer(optimizer(fresh), model=None)
    resumed.load_state_dict(record.state_dict())
    assert torch.equal(fresh["gain"].grad, g1["gain"]) and fresh["bank"].grad is None
    other = {k: v * 3 for k, v in pending[0].items()}  # a second rank's, as two ranks save them
    two = {**record.state_dict(), "pending_gradients": [pending[0], other]}
    fresh = small_params()
    RecordOptimizer(optimizer(fresh), model=None).load_state_dict(two)
    torch.testing.assert_close(fresh["gain"].grad, 2 * g1["gain"])
    assert fresh["lm_head"].grad.dtype == torch.bfloat16


def test_the_mlp_banks_odd_matrices_learn_at_twice_the_rate():
    """With zero momentum and the same gradient for every matrix, the odd matrices of the bank move twice as far."""
    params = {"bank": torch.nn.Parameter(torch.zeros(2, 2, 24, 8))}  # float32: no mantissa
    opt = NorMuonAndAdam(params, {"bank": TABLE["bank"]}, ["bank"], ADAM, dict(NORMUON, momentum=0.0))
    params["bank"].grad = torch.randn(24, 8, generator=torch.Generator().manual_seed(6)).expand(2, 2, 24, 8).clone()
    opt.step(adam=False)
    moved = params["bank"].detach().view(4, 24, 8)
    torch.testing.assert_close(moved[1], 2 * moved[0])
    torch.testing.assert_close(moved[3], 2 * moved[2])
    torch.testing.assert_close(moved[2], moved[0])


def test_the_embedding_is_the_output_layer_transposed_until_untied():
    params, alone = small_params(), small_params()
    del alone["embed"]
    tied, head_only = optimizer(params), optimizer(alone)
    for step in range(4):
        g = grads(params, 10 + step)
        for k, p in params.items():
            p.grad = g[k].clone()
        for k, p in alone.items():  # the output layer alone, given the embedding's gradient too
            p.grad = g[k].clone() if k != "lm_head" else g["lm_head"] + g["embed"].T
        tied.step(adam=True)
        head_only.step(adam=True)
        assert torch.equal(params["lm_head"], alone["lm_head"])
        assert torch.equal(params["embed"], params["lm_head"].T)
    tied.untie()
    head, embed = tied.state["lm_head"], tied.state["embed"]
    assert embed["step"] == head["step"] == 4
    assert torch.equal(embed["exp_avg"], head["exp_avg"].T) and torch.equal(embed["exp_avg_sq"], head["exp_avg_sq"].T)
    g = grads(params, 20)
    for k, p in params.items():
        p.grad = g[k].clone()
    tied.step(adam=True)
    assert not torch.equal(params["embed"], params["lm_head"].T)  # each with its own gradient now


def test_a_table_that_does_not_match_the_parameters_is_refused():
    params = small_params()
    with pytest.raises(ValueError, match="same labels"):
        NorMuonAndAdam(params, TABLE, ["gain"], ADAM, NORMUON)


# ---- two ranks as one process -------------------------------------------------------------------------------------

RECORD_SHAPES = dict(
    qk_bank=(4, 16, 32),
    vo_bank=(2, 32, 32),
    mlp_bank=(2, 2, 128, 32),
    scalars=(24,),
    smear_gate=(1, 12),
    skip_gate=(1, 12),
    attn_gate_bank=(10, 6, 12),
    ve_gate_bank=(5, 6, 12),
    lm_head=(32, 64),
    bigram_embed=(40, 16),
    post_lambdas=(11, 2),
    x0_lambdas=(11,),
    bigram_lambdas=(11,),
    resid_lambdas=(11, 2),
    xsa_alphas=(11, 6),
    value_embeds=(320, 32),
    embed=(64, 32),
    mudd_w1=(2, 8, 32),
    mudd_w2=(2, 14, 8),
    mudd_b2=(2, 14),
)
FLOAT32 = {"scalars", "post_lambdas", "x0_lambdas", "bigram_lambdas", "resid_lambdas", "xsa_alphas"}
SCHEDULE = TrainingSchedule(scheduled_steps=12, extension_steps=2)  # untied at step 9
RESUME_AT = 6


def record_params() -> dict:
    gen = torch.Generator().manual_seed(7)
    params = {
        k: torch.nn.Parameter(torch.randn(s, generator=gen).to(torch.float32 if k in FLOAT32 else torch.bfloat16)) for k, s in RECORD_SHAPES.items()
    }
    with torch.no_grad():
        params["embed"].copy_(params["lm_head"].T)
    return params


def rank_grads(step: int, rank: int) -> tuple[dict, np.ndarray]:
    """A rank's gradients: multiples of 2**-10 below 2**-7, so that any sum of them and its halving are exact in bf16
    (whatever order the ranks' gradients are added in). The bigram embedding's are zero off the rows its tokens touch."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    out = {
        k: (torch.randint(-8, 9, s, generator=gen) * 2.0**-10).to(torch.float32 if k in FLOAT32 else torch.bfloat16) for k, s in RECORD_SHAPES.items()
    }
    rows = np.unique(torch.randint(0, RECORD_SHAPES["bigram_embed"][0], (6,), generator=gen).numpy())
    touched = torch.zeros(RECORD_SHAPES["bigram_embed"][0], dtype=torch.bool)
    touched[torch.from_numpy(rows)] = True
    out["bigram_embed"] = out["bigram_embed"] * touched[:, None]
    return out, rows


def run(params: dict, opt: NorMuonAndAdam, steps: range, ranks: list[int]) -> None:
    """The steps' updates, each rank's gradients averaged over `ranks` (one rank: its own)."""
    for step in steps:
        per_rank = [rank_grads(step, r) for r in ranks]
        for k, p in params.items():
            g = sum(grads[k] for grads, _ in per_rank) / len(ranks) if len(ranks) > 1 else per_rank[0][0][k]
            p.grad = g.clone() if p.grad is None else p.grad + g
        for _, rows in per_rank:
            opt.mark_rows("bigram_embed", rows)
        settings = SCHEDULE.at(step)
        if settings.adam:
            opt.share_row_indexes()
        param_table.train_step(opt, settings)


def _two_rank_worker(rank: int, init_file: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        params = record_params()
        # The sparse exchange of the bigram embedding's rows, as the record runs it on eight ranks.
        opt = NorMuonAndAdam(params, param_table.PARAM_TABLE, param_table.WORK_ORDER, param_table.ADAM, param_table.NORMUON, sparse_comms=True)
        assert opt.cfgs["bigram_embed"].comms == "sharded_sparse" and opt.cfgs["qk_bank"].chunk == 2
        run(params, opt, range(RESUME_AT), [rank])
        state = opt.state_dict()  # a collective: both ranks gather the whole state
        weights = {k: p.detach().clone() for k, p in params.items()}
        run(params, opt, range(RESUME_AT, SCHEDULE.total_steps), [rank])
        torch.save(
            {"resume": state, "resume_params": weights, "params": {k: p.detach() for k, p in params.items()}, "state": opt.state_dict()},
            f"{out}.{rank}",
        )
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_step_exactly_as_one_process(tmp_path):
    """Sharded banks and embeddings, replicated scalars, the bigram embedding's sparse rows and the untying, on two
    ranks, give every rank the weights one process computes from the ranks' averaged gradients, bit for bit; and the
    state the two ranks save resumes in one process."""
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "rdzv"), str(tmp_path / "out")), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    params = record_params()
    one = param_table.record_optimizer(params, world=1, grad_accum=8)
    run(params, one, range(SCHEDULE.total_steps), [0, 1])
    assert SCHEDULE.untie_step < SCHEDULE.total_steps and not one.tied
    for r, got in enumerate(ranks):
        for k, p in params.items():
            assert torch.equal(got["params"][k], p.detach()), f"rank {r}: {k}"
        assert got["state"]["tied"] is False
        for k, state in got["state"]["params"].items():
            for key, value in state.items():
                want = one.state[k][key]
                assert torch.equal(value, want) if isinstance(value, torch.Tensor) else value == want, f"rank {r}: {k} {key}"
    # A fresh process, from the two ranks' weights and gathered state at RESUME_AT.
    resumed_params = record_params()
    with torch.no_grad():
        for k, p in resumed_params.items():
            p.copy_(ranks[0]["resume_params"][k])
    resumed = param_table.record_optimizer(resumed_params, world=1, grad_accum=8)
    resumed.load_state_dict(ranks[0]["resume"])
    run(resumed_params, resumed, range(RESUME_AT, SCHEDULE.total_steps), [0, 1])
    for k, p in params.items():
        assert torch.equal(resumed_params[k], p), k


# ---- the check against the record's code ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "extra", "needle"),
    [
        (None, [], "does not exist"),
        ("import os\n", [], "holds no NorMuonAndAdam"),
        ("class NorMuonAndAdam:\n    pass\n", ["--steps", "0"], "--steps 0"),
    ],
)
def test_the_check_script_refuses_what_it_cannot_compare_in_one_line(record, extra, needle, tmp_path, capsys):
    """It runs the record's own code, which is never in this repository: without it, it says what to pass."""
    path = tmp_path / "record.txt"
    if record is not None:
        path.write_text(record)
    with pytest.raises(SystemExit) as e:
        script_module("speedrun_2026_07_17_check_optim").main(["--record", str(path), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and len(err.splitlines()) == 1, err


@pytest.mark.slow  # compiles a graph per parameter shape
def test_the_compiled_update_stays_within_a_rounding_of_the_eager_one():
    """compile=True (what a GPU run uses) compiles every update with the record's static shapes, past dynamo's default
    limit of recompilations, and fuses what the eager update rounds step by step: the weights stay within bf16's
    rounding of each other."""
    eager_params, compiled_params = record_params(), record_params()
    eager = param_table.record_optimizer(eager_params, world=1, grad_accum=8)
    compiled = param_table.record_optimizer(compiled_params, world=1, grad_accum=8, compile=True)
    run(eager_params, eager, range(2), [0])
    run(compiled_params, compiled, range(2), [0])
    start = record_params()
    assert all(not torch.equal(eager_params[k], start[k]) for k in ("qk_bank", "mlp_bank", "lm_head", "scalars"))  # both kinds moved
    for k, p in eager_params.items():
        torch.testing.assert_close(compiled_params[k].float(), p.float(), rtol=2**-6, atol=2**-10, msg=k)
