"""The 2026-07-17 record's model against job/speedrun_2026_07_17's, in one process on the CPU: the same initial
weights from a seed, then, from the same perturbed weights and batch, the forward losses and every gradient.

    python scripts/speedrun_2026_07_17_check.py --record PATH [--size small|full] [--seq-len N] [--out FILE.json]

PATH is the record's log (records/track_1_short/2026-07-17_FP8DownProjection/this_pr/*.txt, which starts with its
train_gpt.py and triton_kernels.py) or its train_gpt.py with triton_kernels.py beside it. The record's code is read
from there at run time and never copied into this repository.

It runs on a CPU, so the parts of the record that need CUDA, Triton or a downloaded kernel are replaced by torch
definitions of the same arithmetic, each written here from the record's kernel source (not taken from the port):

- triton_kernels.linear_relu_square (the MLP's Triton kernel: bf16 or FP8 up projection, ReLU², the e4m3 copy of
  the activations and their amax; and its backward), reduce_mlp_activation_scales, quantize_transpose_mlp_down_weights
  and transpose_copy: torch functions of the same roundings (the partial amaxes go to the first slot of each layer's
  row, the others 0, which the reduction's max does not see);
- the CUDA C kernel ce_fwd_bwd_kernel (the soft-capped multi-token cross-entropy and its gradient): the same
  per-row arithmetic in float32 (the kernel's fast-math tanh, exp and log are the exact ones here);
- torch._scaled_mm: the FP8 values dequantised to float32 and multiplied there, then scaled (torch's CPU _scaled_mm
  is a reference loop, far too slow); the port does the same on a CPU;
- FlashAttention-3's flash_attn_varlen_func (a downloaded CUDA kernel): scaled_dot_product_attention over a mask
  built per document here, causal with window_size[0] keys back;
- the key shift of the long-window layers, `k[:, 1:, ..] = k[:, :-1, ..]`: its right side is cloned first. The record
  runs it compiled, which reads the old keys (a shift by one); eager torch copies row by row over the overlap and
  would smear the first row down the sequence;
- FusedSoftcappedCrossEntropy.backward returns 7 gradients for its 8 inputs, which the compiled record accepts and
  eager autograd refuses: an eighth None is added (grad_scale's);
- placement: the CPU for its CUDA device, one process standing for the record's 8 ranks (world_size 8 sizes its
  parameter banks; grad_accum_steps 1), 132 for the GPU's SM count (a scratch buffer's size);
- the main program is not run: the check repeats its dtype casts (bf16 embeddings, linears and banks) and its
  quantize_mlp_fp8(bootstrap_down=True) after building the model.

Both models are built at the same size (small by default: 4 heads of 32, width 128, bigram embedding 64 wide;
--size full is the record's 6 x 128) with the record's vocabulary, and must come out of the same seed with the
same weights. Seeded noise is then added to every weight (zero-initialised ones would hide parts of the model), the
same weights are loaded into both, and on one batch of documents the check compares: the training forward (FP8 MLPs,
FP8 output layer, three multi-token weights) and every gradient of the summed loss; the same without FP8 MLPs;
evaluation's losses; the FP8 scales after two quantize_mlp_fp8 calls and a forward; a forward after a YaRN window
change. It prints each figure's largest difference and whether the two are bit for bit equal, exits 1 if any is not.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from job.errors import ArgumentParser, UserError, check_output_path, cli_main, int_arg  # noqa: E402
from job.speedrun_2026_07_17 import bos_loader, transformer  # noqa: E402

SEED = 1234
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
SIZES = {
    "small": dict(num_heads=4, head_dim=32, model_dim=128, bigram_vocab_size=50304, bigram_dim=64),
    "full": dict(num_heads=6, head_dim=128, model_dim=768, bigram_vocab_size=50304 * 15, bigram_dim=192),
}
BLOCK = 128  # the record's windows come in 128-token blocks


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


def check_out_file(out: Path) -> None:
    """--out names a file that can be written, refused now rather than after the run."""
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: pass the path of a JSON file, e.g. {out / 'speedrun_2026_07_17_check.json'}")
    check_output_path(out, "--out")


def _replace(source: str, old: str, new: str, what: str) -> str:
    if old not in source:
        raise UserError(
            f"--record: the record's code has no {what} where this check expects it: pass the "
            "2026-07-17_FP8DownProjection record (its train_gpt.py or log)"
        )
    return source.replace(old, new)


def train_definitions(source: str) -> str:
    """train_gpt.py's definitions (up to its main program), with the replacements the docstring lists."""
    body = source.split("import copy", 1)[1].split(MAIN)[0]
    body = "import os\nimport sys\nimport copy" + body
    body = _replace(
        body, "torch.empty(\n    1, device=f\"cuda:{os.environ['LOCAL_RANK']}\", requires_grad=True\n).backward()", "", "start-up CUDA call"
    )
    start, end = body.index('rank = int(os.environ["RANK"])'), body.index("master_process = (rank == 0)")
    body = body[:start] + "rank, world_size = 0, 8\ngrad_accum_steps = 1\ngrad_scale = 1.0\ndevice = torch.device('cpu')\n" + body[end:]
    body = _replace(body, "torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count", "132", "SM count")
    body = _replace(
        body,
        "k[:, 1:, :, self.head_dim // 2:] = k[:, :-1, :, self.head_dim // 2:]",
        "k[:, 1:, :, self.head_dim // 2:] = k[:, :-1, :, self.head_dim // 2:].clone()",
        "key shift",
    )
    body = _replace(body, "pin_memory=True", "pin_memory=False", "pinned memory")
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


def load_record(path: Path) -> dict:
    """The record's definitions, executed with the replacements; returns train_gpt.py's namespace."""
    train_src, kernels_src = read_record(path)
    train_code, kernels_code = train_definitions(train_src), kernel_definitions(kernels_src)
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
        )
        sys.modules["triton_kernels"] = kernels_mod
        record = types.ModuleType("record_train_gpt")  # a module, for the dataclasses that look themselves up
        sys.modules[record.__name__] = record
        ns = record.__dict__
        ns["_scaled_mm"] = scaled_mm
        exec(compile(train_code, f"{path} (train_gpt.py)", "exec"), ns)  # noqa: S102 - the record's code, fetched by the user
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    ns["dist"] = OneProcess()
    return ns


# --- the two models ----------------------------------------------------------------------------------------------
def build_record(ns: dict, size: dict, seq_len: int):
    args = ns["args"]
    args.bigram_vocab_size, args.bigram_dim = size["bigram_vocab_size"], size["bigram_dim"]
    torch.manual_seed(SEED)
    model = ns["GPT"](
        vocab_size=50257, num_layers=11, num_heads=size["num_heads"], head_dim=size["head_dim"], model_dim=size["model_dim"], max_seq_len=seq_len
    )
    for m in model.modules():  # the main program's casts
        if isinstance(m, torch.nn.Embedding | torch.nn.Linear):
            m.weight.data = m.weight.data.bfloat16()
    for name in transformer.BF16_PARAMS:
        getattr(model, name).data = getattr(model, name).data.bfloat16()
    return model


def build_port(size: dict, seq_len: int):
    torch.manual_seed(SEED)
    return transformer.GPT(transformer.GPTConfig(max_seq_len=seq_len, **size))


def perturb(model) -> None:
    """Seeded noise on every weight, by name, in each weight's dtype."""
    g = torch.Generator().manual_seed(SEED + 1)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            std = 0.3 if p.ndim < 2 else 0.05 if name in ("lm_head.weight", "embed.weight") else 0.02
            p.add_((torch.randn(p.shape, generator=g) * std).to(p.dtype))


def batch(seq_len: int, ns: dict, bigram_vocab_size: int):
    """One packed sequence: random GPT-2 ids, documents starting at <|endoftext|>, and what the loader makes of it."""
    g = torch.Generator().manual_seed(SEED + 2)
    tokens = torch.randint(0, 50256, (seq_len + 1,), generator=g)
    starts = torch.randint(1, seq_len, (max(1, seq_len // 300),), generator=g)
    tokens[starts] = 50256
    tokens[0] = 50256
    inputs, targets = tokens[:-1].to(torch.int32), tokens[1:].to(torch.int64)
    bos = torch.nonzero(inputs == 50256)[:, 0]
    seqlens = torch.full((len(bos) + 4,), seq_len, dtype=torch.int32)
    seqlens[: len(bos)] = bos
    bigram = bos_loader.bigram_hash(inputs, bigram_vocab_size)
    assert torch.equal(bigram, ns["get_bigram_hash"](inputs).to(torch.int32))
    return inputs, targets, seqlens, bigram


# --- the comparisons -----------------------------------------------------------------------------------------------
def difference(a: torch.Tensor, b: torch.Tensor) -> dict:
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


def state_differences(record, port) -> dict:
    ours = port.state_dict()
    out = {f"init/{k}": difference(ours[k], v) for k, v in record.state_dict().items()}
    out["init/keys"] = {"equal": set(ours) == set(record.state_dict()), "max_abs": 0.0}
    rec_params, our_params = dict(record.named_parameters()), dict(port.named_parameters())
    same_tags = all(
        rec_params[n].label == our_params[n].label and rec_params[n].__dict__.get("reshape") == our_params[n].__dict__.get("reshape")
        for n in rec_params
    )
    out["init/labels and optimizer shapes"] = {"equal": same_tags, "max_abs": 0.0}
    return out


def train_step(model, data, schedule) -> tuple[torch.Tensor, dict]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(*data, schedule)
    loss.sum().backward()  # the record's loss: the sum times grad_scale, 1 for its 8 ranks
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def compare_training(rec, ours, data, schedules, tag: str) -> dict:
    out = {}
    rec_loss, rec_grads = train_step(rec, data, schedules[0])
    our_loss, our_grads = train_step(ours, data, schedules[1])
    out[f"{tag}/loss"] = difference(our_loss, rec_loss)
    for name, g in rec_grads.items():
        if g is None or our_grads[name] is None:
            out[f"{tag}/grad/{name}"] = {"equal": g is None and our_grads[name] is None, "max_abs": 0.0, "why": "no gradient"}
        else:
            out[f"{tag}/grad/{name}"] = difference(our_grads[name], g)
    out[f"{tag}/mlp activation scales"] = difference(ours._mlp_down_act_scales, rec._mlp_down_act_scales)
    return out


def compare_eval(rec, ours, data, schedules, tag: str) -> dict:
    rec.eval()
    ours.eval()
    with torch.no_grad():
        return {f"{tag}/loss": difference(ours(*data, schedules[1]), rec(*data, schedules[0]))}


def compare_quantization(rec, ours) -> dict:
    out = {}
    for name in ("_mlp_down_proj_scales", "_mlp_down_proj_next_scales", "_mlp_up_proj_scales"):
        out[f"quantize/{name}"] = difference(getattr(ours, name), getattr(rec, name))
    for name in ("_mlp_up_proj_f8", "_mlp_down_proj_f8"):
        out[f"quantize/{name}"] = difference(getattr(ours, name).float(), getattr(rec, name).float())
    return out


def schedules(ns, mtp: list[float], ws_short: int, ws_long: int, seq_len: int):
    weights = torch.tensor(mtp)
    return (
        ns["ForwardScheduleConfig"](mtp_weights=weights, ws_short=ws_short, ws_long=ws_long, train_max_seq_len=seq_len),
        transformer.ForwardSchedule(mtp_weights=weights, ws_short=ws_short, ws_long=ws_long, train_max_seq_len=seq_len),
    )


def run_checks(ns: dict, size: dict, seq_len: int) -> dict:
    rec, ours = build_record(ns, size, seq_len), build_port(size, seq_len)
    results = state_differences(rec, ours)
    perturb(rec)
    ours.load_state_dict(rec.state_dict())
    for m in (rec, ours):
        m.quantize_mlp_fp8(bootstrap_down=True)
    results.update(compare_quantization(rec, ours))
    data = batch(seq_len, ns, size["bigram_vocab_size"])
    short, long = BLOCK, 3 * BLOCK
    sched = schedules(ns, [1.0, 0.5, 0.25], short, long, seq_len)
    results.update(compare_training(rec, ours, data, sched, "train fp8"))
    os.environ["DISABLE_FP8"] = "1"
    ours.config.fp8 = False
    try:
        results.update(compare_training(rec, ours, data, schedules(ns, [1.0, 0.5], short, long, seq_len), "train bf16"))
    finally:
        del os.environ["DISABLE_FP8"]
        ours.config.fp8 = True
    results.update(compare_eval(rec, ours, data, sched, "eval"))
    # An optimizer step's change to the MLPs, then the delayed scales: the next quantisation uses the last one's amax.
    g = torch.Generator().manual_seed(SEED + 3)
    noise = (torch.randn(rec.mlp_bank.shape, generator=g) * 0.01).to(torch.bfloat16)
    for m in (rec, ours):
        with torch.no_grad():
            m.mlp_bank.add_(noise)
        m.quantize_mlp_fp8(bootstrap_down=False)
    results.update({k.replace("quantize/", "requantize/"): v for k, v in compare_quantization(rec, ours).items()})
    results.update(compare_training(rec, ours, data, sched, "train fp8 after requantize"))
    # The long window grows from 3 to 7 blocks: YaRN on both rotary tables.
    rec.yarn.apply(long, 7 * BLOCK)
    rec.yarn_paired_head.apply(long, 7 * BLOCK)
    ours.rescale_rotary(long, 7 * BLOCK)
    for name in ("yarn", "yarn_paired_head"):
        for table in ("factor1", "factor2"):
            results[f"yarn/{name}.{table}"] = difference(getattr(getattr(ours, name), table), getattr(getattr(rec, name), table))
        same = getattr(ours, name).attn_scale == getattr(rec, name).attn_scale
        results[f"yarn/{name}.attn_scale"] = {"equal": same, "max_abs": abs(getattr(ours, name).attn_scale - getattr(rec, name).attn_scale)}
    results.update(compare_eval(rec, ours, data, schedules(ns, [1.0], 3 * BLOCK, 7 * BLOCK, seq_len), "eval after yarn"))
    return results


def report(results: dict) -> str:
    lines = []
    for name, r in results.items():
        mark = "equal" if r["equal"] else "DIFF "
        extra = f"  ({r['why']})" if "why" in r else ""
        lines.append(f"{mark}  max |diff| {r['max_abs']:.3g}  max |record| {r.get('max_ref', 0):.3g}  {name}{extra}")
    unequal = sum(not r["equal"] for r in results.values())
    lines.append(f"{len(results) - unequal} of {len(results)} figures bit for bit equal")
    return "\n".join(lines)


@cli_main
def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--record", type=Path, required=True, help="the record's log (.txt) or its train_gpt.py")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="model size (default small)")
    p.add_argument("--seq-len", type=int_arg(BLOCK, 1 << 16), default=512, help="tokens in the batch (default 512)")
    p.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    # Everything that can be refused is refused before the minutes of the run.
    check_record_path(args.record)
    if args.out is not None:
        check_out_file(args.out)
    ns = load_record(args.record)
    results = run_checks(ns, SIZES[args.size], args.seq_len)
    print(report(results))
    if args.out is not None:
        args.out.write_text(json.dumps({"size": args.size, "seq_len": args.seq_len, "torch": torch.__version__, "results": results}, indent=1) + "\n")
    if not all(r["equal"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
