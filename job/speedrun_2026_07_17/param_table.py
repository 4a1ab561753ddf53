"""Which optimizer trains which of the record's parameters, with what multipliers, in what order, and what changes at
each step (modded-nanogpt's record of 2026-07-17, its TrainingManager).

The labels are the model's parameter names without ".weight" (`labelled`). NorMuon trains the three weight banks;
Adam the rest: the scalars and gates with betas (0.9, 0.99), the per-layer lambdas with (0.9, 0.95), the embeddings
and the output layer with a low beta1 (0.5, 0.75) and a strong weight decay. The MUDD connections' weights learn at a
quarter of Adam's rate.
"""

from __future__ import annotations

from job.speedrun_2026_07_17.normuon import NorMuonAndAdam
from job.speedrun_2026_07_17.schedule import RECORD_RANKS, StepSettings


def _adam(betas: tuple[float, float], **muls) -> dict:
    return {"optim": "adam", "comms": muls.pop("comms", "replicated"), "adam_betas": betas, **muls}


_NORMUON = {"optim": "normuon", "comms": "sharded", "adam_betas": None}

# The order in which gradients' reductions are launched: the banks first, as they take longest.
PARAM_TABLE = {
    "qk_bank": _NORMUON,
    "vo_bank": _NORMUON,
    "mlp_bank": {**_NORMUON, "per_matrix_lr_mul": (1.0, 2.0)},  # up, down, up, ...: the down projections learn at 2x
    "scalars": _adam((0.9, 0.99), lr_mul=5.0, wd_mul=0.0),
    "smear_gate": _adam((0.9, 0.99), lr_mul=0.01, wd_mul=0.0),
    "skip_gate": _adam((0.9, 0.99), lr_mul=0.05, wd_mul=0.0),
    "attn_gate_bank": _adam((0.9, 0.99)),
    "ve_gate_bank": _adam((0.9, 0.99)),
    "lm_head": _adam((0.5, 0.95), comms="sharded", wd_mul=150.0),
    "bigram_embed": _adam((0.75, 0.95), comms="sharded_sparse", lr_mul=75.0, wd_mul=5.0),
    "post_lambdas": _adam((0.9, 0.95), lr_mul=1.0, wd_mul=0.0),
    "x0_lambdas": _adam((0.9, 0.95), lr_mul=1.0, wd_mul=0.0),
    "bigram_lambdas": _adam((0.9, 0.95), lr_mul=1.0, wd_mul=0.0),
    "resid_lambdas": _adam((0.9, 0.95), lr_mul=5.0, wd_mul=0.0),
    "xsa_alphas": _adam((0.9, 0.95), lr_mul=1.0, wd_mul=0.0),
    "value_embeds": _adam((0.75, 0.95), comms="sharded", lr_mul=75.0, wd_mul=5.0),
    "embed": _adam((0.5, 0.95), comms="sharded", wd_mul=150.0),
    "mudd_w1": _adam((0.9, 0.99), lr_mul=0.25),
    "mudd_w2": _adam((0.9, 0.99), lr_mul=0.25),
    "mudd_b2": _adam((0.9, 0.99), lr_mul=0.25, wd_mul=0.0),
}

# The order in which updates are computed: small parameters while the large reductions are still on the wire; the
# output layer before the embedding (which copies it while tied); the banks' orthogonalisation last.
WORK_ORDER = [
    "scalars",
    "smear_gate",
    "skip_gate",
    "attn_gate_bank",
    "ve_gate_bank",
    "mudd_b2",
    "xsa_alphas",
    "post_lambdas",
    "x0_lambdas",
    "bigram_lambdas",
    "resid_lambdas",
    "mudd_w2",
    "value_embeds",
    "bigram_embed",
    "mudd_w1",
    "lm_head",
    "embed",
    "qk_bank",
    "vo_bank",
    "mlp_bank",
]

ADAM = dict(lr=0.008, eps=1e-10, weight_decay=0.005)
NORMUON = dict(lr=0.023, momentum=0.95, beta2=0.9, weight_decay=1.2)


def labelled(model) -> dict:
    """The model's parameters by label."""
    return {name.removesuffix(".weight"): p for name, p in model.named_parameters()}


def record_optimizer(params: dict, world: int, grad_accum: int, compile: bool = False) -> NorMuonAndAdam:
    """The record's optimizer over `params` (label -> parameter). The bigram embedding's gradient travels as sparse
    rows where the record sends it so: on eight ranks with one micro-batch each (elsewhere the saving does not pay)."""
    return NorMuonAndAdam(params, PARAM_TABLE, WORK_ORDER, ADAM, NORMUON, sparse_comms=world == RECORD_RANKS and grad_accum == 1, compile=compile)


def train_step(optimizer: NorMuonAndAdam, settings: StepSettings) -> None:
    """One step's update, after its gradients: the step's learning rate and momentum, Adam on odd steps only, and at
    the untying step the embedding's own Adam state from then on."""
    optimizer.set_step(settings.lr, settings.muon_momentum)
    optimizer.step(adam=settings.adam)
    if settings.untie:
        optimizer.untie()
