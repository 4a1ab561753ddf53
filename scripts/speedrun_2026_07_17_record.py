"""The record of 2026-07-17's own code (modded-nanogpt's train_gpt.py and triton_kernels.py), read from its log or
files at run time and loaded on the CPU, for the scripts that hold the port (job/speedrun_2026_07_17/) to it:
speedrun_2026_07_17_check.py (the model), speedrun_2026_07_17_check_optim.py (optimizer, schedule, loader) and
speedrun_2026_07_17_check_trainer.py (the training loop). The record's code is never copied into this repository.

Two ways to load it:

- load_record: train_gpt.py's definitions (everything before its main program) and triton_kernels.py, executed with
  the CUDA, Triton and FlashAttention parts replaced by the torch definitions below, each written from the record's
  kernel source: the model, its optimizer, schedule and loader in one namespace. `eager` leaves torch.compile out
  (the functions run as written), as the port runs on a CPU.
- load_optimizer: only the definitions the optimizer, schedule and loader need (DEFINITIONS), picked from the source
  by name, with the Triton products given as arguments, on this process's rank of a gloo group.

What each replaces is listed in the docstrings of the scripts that use it.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from job.errors import UserError  # noqa: E402
from job.speedrun_2026_07_17 import polar_express, varlen  # noqa: E402

KERNELS_HEADER = f"\n\n{'-' * 40}\n# triton_kernels.py\n{'-' * 40}\n\n"  # between the two files in the record's log
MAIN = "# int main"  # train_gpt.py's line between its definitions and its main program
RECORD_DIR = "records/track_1_short/2026-07-17_FP8DownProjection/this_pr"
RECORD_LOG = (
    "https://raw.githubusercontent.com/KellerJordan/modded-nanogpt/f411b3d346aa52d3504324ca93c230fd84c6c07f/"
    f"{RECORD_DIR}/11cb620c-daaf-4e85-83fc-258a5eb7ba09.txt"
)
GET_RECORD = (
    f"pass the record's log (`curl -LO {RECORD_LOG}`; its 13 logs hold the same code) or the train_gpt.py it starts with, triton_kernels.py beside it"
)
# The record's two files as code_digest reads them (the same in all 13 logs): another record's, or an edited copy, is not it.
DIGESTS = {
    "train_gpt.py": "ad9faf7d0431e68c594c557e524dbee974cb6e8c2661f5e10947ee43003651f3",
    "triton_kernels.py": "ac71b289b29fc0c2bcc7a2732a152bae26103219cba2a338d60a7cc9541f0e35",
}


# --- the record's sources ------------------------------------------------------------------------------------
def code_digest(source: str) -> str:
    """sha256 of the code with trailing spaces and blank lines at either end left out: the same for the log's part
    and the file cut from it by hand."""
    return hashlib.sha256("\n".join(line.rstrip() for line in source.strip().splitlines()).encode()).hexdigest()


def record_sources(path: Path) -> tuple[str, str | None]:
    """(train_gpt.py, triton_kernels.py or None) from the record's log, or from its train_gpt.py and the file beside it."""
    text = path.read_text()
    if KERNELS_HEADER in text:  # a log: train_gpt.py, the header, triton_kernels.py, then a line of '='
        train, rest = text.split(KERNELS_HEADER, 1)
        return train, rest.split("=" * 100)[0]
    kernels = path.with_name("triton_kernels.py")
    return text, kernels.read_text() if kernels.is_file() else None


def not_the_record(train: str, kernels: str | None) -> str | None:
    """Why these are not the record's two files, in a few words, or None when they are. Read, never run."""
    if not train.strip():
        return "it is empty"
    if MAIN not in train:
        return f"it has no `{MAIN}` line between the model's code and the training loop"
    try:
        ast.parse(train.split(MAIN)[0])
    except SyntaxError as e:
        return f"line {e.lineno} is not Python: {e.msg}"
    if code_digest(train) != DIGESTS["train_gpt.py"]:
        return "it is another version of the record's code: another record, or an edited copy"
    if kernels is None:
        return "a train_gpt.py without the record's triton_kernels.py beside it"
    if code_digest(kernels) != DIGESTS["triton_kernels.py"]:
        return "the triton_kernels.py with it is another version: another record's, or an edited copy"
    return None


def check_record_path(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"--record {path} is a directory: {GET_RECORD}")
    if not path.is_file():
        raise UserError(f"--record {path} does not exist: {GET_RECORD}")


def read_record(path: Path) -> tuple[str, str]:
    """The record's train_gpt.py and triton_kernels.py, or one line saying that the file is not it and where it is."""
    check_record_path(path)
    try:
        train, kernels = record_sources(path)
    except UnicodeDecodeError:
        train, kernels, why = "", None, "it is not text"
    else:
        why = not_the_record(train, kernels)
    if why:
        raise UserError(f"--record {path} is not the record's train_gpt.py or log ({why}): {GET_RECORD}")
    return train, kernels


def _replace(source: str, old: str, new: str, what: str) -> str:
    if old not in source:
        raise UserError(
            f"--record: the record's code has no {what} where this check expects it: pass the "
            "2026-07-17_FP8DownProjection record (its train_gpt.py or log)"
        )
    return source.replace(old, new)


def train_definitions(source: str, world: int = 8, grad_accum: int = 1) -> str:
    """train_gpt.py's definitions (up to its main program), with the replacements the scripts' docstrings list; its
    process's placement is `world` ranks (which sizes its parameter banks) of `grad_accum` micro-steps each, rank 0."""
    body = source.split("import copy", 1)[1].split(MAIN)[0]
    body = "import os\nimport sys\nimport copy" + body
    body = _replace(
        body, "torch.empty(\n    1, device=f\"cuda:{os.environ['LOCAL_RANK']}\", requires_grad=True\n).backward()", "", "start-up CUDA call"
    )
    start, end = body.index('rank = int(os.environ["RANK"])'), body.index("master_process = (rank == 0)")
    placement = f"rank, world_size = 0, {world}\ngrad_accum_steps = {grad_accum}\ngrad_scale = 1 / grad_accum_steps\n"
    body = body[:start] + placement + "device = torch.device('cpu')\n" + body[end:]
    body = _replace(body, "torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count", "132", "SM count")
    body = _replace(
        body,
        "k[:, 1:, :, self.head_dim // 2:] = k[:, :-1, :, self.head_dim // 2:]",
        "k[:, 1:, :, self.head_dim // 2:] = k[:, :-1, :, self.head_dim // 2:].clone()",
        "key shift",
    )
    body = _replace(body, "pin_memory=True", "pin_memory=False", "pinned memory")
    body = _replace(body, 'device="cuda"', 'device="cpu"', "loader's device")
    return _replace(body, "torch._scaled_mm(", "_scaled_mm(", "FP8 matmul")


def kernel_definitions(source: str) -> str:
    """triton_kernels.py with its CUDA C kernel's compilation replaced by the torch definition below."""
    start = source.index("ce_fwd_bwd_kernel = torch.cuda._compile_kernel(")
    end = source.index("ce_fwd_bwd_kernel.set_shared_memory_config(CE_KERNEL_VOCAB_SIZE * 2)")
    end = source.index("\n", end)
    source = source[:start] + "ce_fwd_bwd_kernel = _ce_fwd_bwd_kernel" + source[end:]
    source = _replace(
        source,
        "        return grad_x, None, None, grad_w, None, None, None\n",
        "        return grad_x, None, None, grad_w, None, None, None, None\n",
        "cross-entropy backward",
    )
    return _replace(source, "torch._scaled_mm(", "_scaled_mm(", "FP8 matmul")


# --- torch definitions of what the record runs on the GPU --------------------------------------------------------
def scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum=False):
    return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)


def linear_relu_square(a, b, aux=None, a_f8=None, b_f8=None, dequant_scale_ptr=None, activation_scale=None, partial_amax=None):
    """The Triton kernel linear_relu_square_kernel and its launcher: forward (aux None) c = a @ b.T rounded to bf16
    (in FP8: the float32 product of the e4m3 operands times the dequantisation scale), aux = relu(c)² in bf16, and
    with an activation scale the e4m3 copy min(aux / scale, 448) and the amax; backward c = 2 (a @ b.T) relu(aux)."""
    if b_f8 is not None:
        acc = (a_f8.float() @ b_f8.float().T) * dequant_scale_ptr
        c = acc.to(a.dtype)
    else:
        c = a @ b.T
    if aux is not None:
        return 2 * c * torch.where(aux > 0, aux, 0)
    post = torch.clamp_min(c, 0)
    post = post * post
    if activation_scale is None:
        return c, post
    post_fp8 = torch.clamp_max(post.float() * (1.0 / activation_scale), 448.0).to(torch.float8_e4m3fn)
    partial_amax.zero_()
    partial_amax[0] = post.float().max()
    return c, post, post_fp8


def reduce_mlp_activation_scales(partial_amax, scales, headroom=1.25):
    amax = partial_amax.max(dim=1).values
    scales[: partial_amax.size(0)] = torch.clamp_min(amax, 1.0e-12) * (headroom / 448.0)


def quantize_transpose_mlp_down_weights(weights, output_storage, next_scales, used_scales, partial_amax, headroom=1.12):
    values = weights.float()
    scale = next_scales[: weights.size(0)].view(-1, 1, 1)
    quantized = torch.clamp(torch.clamp(values / scale, max=448.0), min=-448.0)
    output_storage.copy_(quantized.transpose(1, 2).to(torch.float8_e4m3fn))
    used_scales[: weights.size(0)] = next_scales[: weights.size(0)]
    partial_amax.zero_()
    partial_amax[:, 0] = values.abs().amax(dim=(1, 2))
    reduce_mlp_activation_scales(partial_amax, next_scales, headroom=headroom)


def transpose_copy(src, dst):
    dst.copy_(src.T)


def transpose_add(src, dst):
    dst.add_(src.T)


def _ce_fwd_bwd_kernel(grid, block, args, shared_mem=0):
    """The CUDA C kernel ce_fwd_bwd_kernel, one row per block: losses and the e5m2 gradient of the logits."""
    logits, targets, w, losses, grad_input, n, n_predict, A, B, C, grad_s, grad_scale = args
    f32 = np.float32
    inv_c = f32(1) / f32(C)
    u = logits.float() * float(inv_c) + float(f32(B) * inv_c)
    sig = 0.5 + torch.tanh(u * 0.5) * 0.5
    s = sig.to(torch.bfloat16)
    block_max = (A * sig).amax(dim=1)
    z = A * s.float()
    lse = block_max + torch.log(torch.exp(z - block_max[:, None]).sum(dim=1))
    rows = torch.arange(n)
    total = torch.zeros(n)
    for k in range(n_predict):
        valid = rows + k < n
        target = targets[torch.clamp_max(rows + k, n - 1)]
        total = torch.where(valid, total + w[k] * (lse - A * s[rows, target].float()), total)
    losses.copy_(total)
    s_w = torch.zeros(())
    for i in range(n_predict):
        s_w = s_w + w[i]
    grad_z = s_w * torch.exp(z - lse[:, None])
    for i in range(n_predict):
        r = rows[rows + i < n]
        target = targets[r + i]
        term2 = torch.zeros(len(r))
        for k in range(min(3, n_predict)):
            ok = (r + k < n) & (targets[torch.clamp_max(r + k, n - 1)] == target)
            term2 = term2 + torch.where(ok, w[k], 0.0)
        grad_z[r, target] = s_w * torch.exp(A * s[r, target].float() - lse[r]) - term2
    coef = f32(grad_scale) * (f32(1) / f32(C) * f32(A)) * (f32(1) / f32(grad_s))
    sf = s.float()
    grad = float(coef) * grad_z * sf * (1.0 - sf)
    grad_input.copy_(torch.clamp(grad, -57344.0, 57344.0).to(torch.float8_e5m2))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale, window_size):
    """FlashAttention's varlen attention: each document [cu[j], cu[j+1]) on its own, causal, window_size[0] keys back."""
    T = q.size(0)
    mask = torch.zeros(T, T, dtype=torch.bool)
    bounds = cu_seqlens_q.tolist()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b > a:
            band = torch.ones(b - a, b - a, dtype=torch.bool).tril()
            mask[a:b, a:b] = band & ~torch.ones_like(band).tril(-(window_size[0] + 1))
    heads_first = [t.transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, T, D): torch's CPU flash kernel takes these
    with contextlib.nullcontext() if varlen.cpu_flash_attention(q) else sdpa_kernel(SDPBackend.MATH):  # as the port runs it
        y = F.scaled_dot_product_attention(*heads_first, attn_mask=mask, scale=softmax_scale)
    return y[0].transpose(0, 1).contiguous()


class OneProcess:
    """torch.distributed as the record's model asks it (world size only), for one process standing for 8 ranks."""

    def __getattr__(self, name):
        return getattr(torch.distributed, name)

    @staticmethod
    def get_world_size():
        return 8


def fake_modules() -> dict:
    """Stand-ins for triton (its decorators and helpers, so the kernels' definitions parse) and for the `kernels`
    package (FlashAttention-3 by download)."""
    triton = types.ModuleType("triton")
    triton.jit = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    triton.cdiv = lambda a, b: -(-a // b)
    triton.next_power_of_2 = lambda n: 1 << (n - 1).bit_length()
    triton.__version__ = "none (CPU check)"
    language = types.ModuleType("triton.language")
    language.constexpr = object
    tools = types.ModuleType("triton.tools")
    descriptor = types.ModuleType("triton.tools.tensor_descriptor")
    descriptor.TensorDescriptor = object
    triton.language, triton.tools, tools.tensor_descriptor = language, tools, descriptor
    kernels = types.ModuleType("kernels")
    kernels.get_kernel = lambda *a, **kw: types.SimpleNamespace(
        flash_attn_interface=types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)
    )
    return {"triton": triton, "triton.language": language, "triton.tools": tools, "triton.tools.tensor_descriptor": descriptor, "kernels": kernels}


def load_record(path: Path, world: int = 8, grad_accum: int = 1, eager: bool = False) -> dict:
    """The record's definitions, executed with the replacements; returns train_gpt.py's namespace. world and
    grad_accum: its placement (train_definitions); eager: torch.compile left out, but for the one optimizer function
    the CPU cannot run eagerly (compiled_cautious_update)."""
    train_src, kernels_src = read_record(path)
    train_code, kernels_code = train_definitions(train_src, world, grad_accum), kernel_definitions(kernels_src)
    # torch looks for the real triton when it loads its compiler, which the record's @torch.compile decorators do:
    # load it before the stand-in is in place (nothing is compiled here).
    torch.compile(lambda x: x, dynamic=False, fullgraph=True)
    saved = {name: sys.modules.get(name) for name in [*fake_modules(), "triton_kernels"]}
    sys.modules.update(fake_modules())
    try:
        kernels_mod = types.ModuleType("triton_kernels")
        kernels_mod.__dict__.update(_scaled_mm=scaled_mm, _ce_fwd_bwd_kernel=_ce_fwd_bwd_kernel)
        exec(compile(kernels_code, f"{path} (triton_kernels.py)", "exec"), kernels_mod.__dict__)  # noqa: S102
        kernels_mod.__dict__.update(
            linear_relu_square=linear_relu_square,
            transpose_copy=transpose_copy,
            reduce_mlp_activation_scales=reduce_mlp_activation_scales,
            quantize_transpose_mlp_down_weights=quantize_transpose_mlp_down_weights,
            transpose_add=transpose_add,
            **optimizer_kernels(fp32=False),
        )
        sys.modules["triton_kernels"] = kernels_mod
        record = types.ModuleType("record_train_gpt")  # a module, for the dataclasses that look themselves up
        sys.modules[record.__name__] = record
        ns = record.__dict__
        ns["_scaled_mm"] = scaled_mm
        compile_fn = torch.compile
        if eager:
            torch.compile = eager_compile  # read by the decorators as the definitions run
        try:
            exec(compile(train_code, f"{path} (train_gpt.py)", "exec"), ns)  # noqa: S102 - the record's code, fetched by the user
        finally:
            torch.compile = compile_fn
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    ns["dist"] = OneProcess()
    if eager:
        compiled_cautious_update(ns["NorMuonAndAdam"])
    return ns


def compiled_cautious_update(cls) -> None:
    """NorMuonAndAdam._cautious_wd_and_update_inplace compiled by Inductor, as in the record: its uint32 shifts have
    no eager CPU kernel."""
    fn = cls.__dict__["_cautious_wd_and_update_inplace"].__func__
    cls._cautious_wd_and_update_inplace = staticmethod(torch.compile(fn, dynamic=False, fullgraph=True))


def record_model(ns: dict, num_heads: int, head_dim: int, model_dim: int, max_seq_len: int):
    """The record's GPT as its main program builds it (from torch's RNG as it stands): the record's vocabulary and 11
    layers at this width, then its casts to bf16 (embeddings, linears, banks)."""
    model = ns["GPT"](vocab_size=50257, num_layers=11, num_heads=num_heads, head_dim=head_dim, model_dim=model_dim, max_seq_len=max_seq_len)
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding | torch.nn.Linear):
            m.weight.data = m.weight.data.bfloat16()
    for name in ("attn_gate_bank", "ve_gate_bank", "qk_bank", "vo_bank", "mlp_bank", "mudd_w1", "mudd_w2", "mudd_b2"):
        getattr(model, name).data = getattr(model, name).data.bfloat16()
    return model


def report(results: dict) -> str:
    """One line per figure (equal or DIFF, the largest difference and |record|), then the count of equal ones."""
    lines = []
    for name, r in results.items():
        mark = "equal" if r["equal"] else "DIFF "
        extra = f"  ({r['why']})" if "why" in r else ""
        lines.append(f"{mark}  max |diff| {r['max_abs']:.3g}  max |record| {r.get('max_ref', 0):.3g}  {name}{extra}")
    unequal = sum(not r["equal"] for r in results.values())
    lines.append(f"{len(results) - unequal} of {len(results)} figures bit for bit equal")
    return "\n".join(lines)


def difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far `a` is from the record's `b`: whether equal bit for bit (NaN where both are), the largest difference
    and the largest |b|."""
    a, b = a.detach(), b.detach()
    if a.shape != b.shape or a.dtype != b.dtype:
        return {"equal": False, "max_abs": math.inf, "why": f"{tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"}
    a, b = a.double(), b.double()
    both_nan = a.isnan() & b.isnan()
    diff = torch.where(both_nan, 0.0, (a - b).abs()).nan_to_num(math.inf)
    return {
        "equal": bool(torch.equal(a, b) or (diff == 0).all()),
        "max_abs": float(diff.max()) if diff.numel() else 0.0,
        "max_ref": float(b.abs().nan_to_num(0).max()) if b.numel() else 0.0,
    }


# --- the optimizer's parts alone, on a rank of a gloo group ------------------------------------------------------
DEFINITIONS = {
    "polar_express_coeffs",
    "polar_express",
    "_sparse_comms_active",
    "sparse_comms_start",
    "sparse_comms_share_indexes",
    "sparse_comms_share_gradients",
    "sparse_comms_merge_gradients",
    "ParamConfig",
    "NorMuonAndAdam",
    "next_multiple_of_n",
    "ForwardScheduleConfig",
    "_load_data_shard",
    "BOS_ID",
    "TRAIN_MAX_NUM_DOCS",
    "Shard",
    "get_bigram_hash",
    "distributed_data_generator",
    "Hyperparameters",
    "args",
    "TrainingStage",
    "TrainingSchedule",
    "TRAINING_STAGES",
    "training_schedule",
    "get_muon_momentum",
    "TrainingManager",
}
LEFT_OUT_IMPORTS = ("torch", "triton", "kernels", "triton_kernels")


def record_source(path: Path) -> str:
    text = path.read_text()
    if "=" * 100 in text:  # a log: the code, then a line of '='
        text = text.split("=" * 100)[0]
    return text.split("\n" + "-" * 40 + "\n# triton_kernels.py\n")[0]  # in a log, triton_kernels.py follows


def selected(source: str) -> str:
    """The record's imports (less LEFT_OUT_IMPORTS) and DEFINITIONS, placed on the CPU; every other line blank, so
    that a traceback's line numbers are the file's."""
    tree, lines = ast.parse(source), source.splitlines()
    keep = [""] * len(lines)
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(n.split(".")[0] in LEFT_OUT_IMPORTS for n in names):
                continue
        elif not (bound(node) & DEFINITIONS):
            continue
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        keep[first - 1 : node.end_lineno] = lines[first - 1 : node.end_lineno]
    text = "\n".join(keep)
    return text.replace("pin_memory=True", "pin_memory=False").replace('device="cuda"', 'device="cpu"')


def bound(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.ClassDef):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return {t.id for t in targets if isinstance(t, ast.Name)}


def eager_compile(*args, **kwargs):
    """torch.compile, left out: as a decorator with or without arguments, the function itself."""
    if args and callable(args[0]):
        return args[0]
    return lambda fn: fn


class RecordDist:
    """torch.distributed as the record calls it, on gloo: a reduce-scatter's and an all-gather's handle is waited on
    where the record waits on its future."""

    def __getattr__(self, name):
        return getattr(dist, name)

    @staticmethod
    def reduce_scatter_tensor(out, inp, op=dist.ReduceOp.SUM, async_op=False):
        work = dist.reduce_scatter_single(out, inp, op=op, async_op=async_op)
        return types.SimpleNamespace(get_future=lambda: work, wait=work.wait) if async_op else work

    @staticmethod
    def all_gather_into_tensor(out, inp, async_op=False):
        work = dist.all_gather_single(out, inp, async_op=async_op)
        return types.SimpleNamespace(get_future=lambda: work, wait=work.wait) if async_op else work


def optimizer_kernels(fp32: bool) -> dict:
    """triton_kernels' XXT, XTX and ba_plus_cAA (Polar Express's products): the port's torch calls, or with fp32
    float32 products rounded once (the Triton kernels' arithmetic, whatever the CPU's bf16 matmul does)."""
    if not fp32:  # the port's own calls
        return dict(XXT=polar_express.xxt, XTX=polar_express.xtx, ba_plus_cAA=polar_express.ba_plus_caa)

    def xxt(A, out):
        return out.copy_(A.float() @ A.float().mT)

    def xtx(A, out):
        return out.copy_(A.float().mT @ A.float())

    def ba_plus_caa(A, alpha, beta, out):
        return out.copy_(alpha * (A.float() @ A.float().mT) + beta * A.float())

    return dict(XXT=xxt, XTX=xtx, ba_plus_cAA=ba_plus_caa)


def load_optimizer(path: Path, rank: int = 0, world: int = 1, fp32_kernels: bool = False) -> dict:
    """DEFINITIONS from the record's train_gpt.py, as rank `rank` of `world` (grad_accum_steps 8 / world) on the CPU,
    torch.compile left out (but compiled_cautious_update); returns their namespace."""
    torch_eager = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    torch_eager.compile = eager_compile
    module = types.ModuleType("record")  # dataclasses look their module up
    sys.modules["record"] = module
    ns = module.__dict__
    ns.update(
        {
            "torch": torch_eager,
            "dist": RecordDist(),
            "rank": rank,
            "world_size": world,
            "grad_accum_steps": 8 // world,
            "device": torch.device("cpu"),
            "master_process": rank == 0,
            "transpose_add": transpose_add,
            "transpose_copy": transpose_copy,
            **optimizer_kernels(fp32_kernels),
        }
    )
    from torch import Tensor, nn

    ns.update(Tensor=Tensor, nn=nn)
    exec(compile(selected(record_source(path)), str(path), "exec"), ns)  # noqa: S102 - the record's code, fetched by the user
    ns["torch"] = torch
    compiled_cautious_update(ns["NorMuonAndAdam"])
    return ns
