import copy
import math
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch.nn.attention import SDPBackend
from torch.profiler import profile

from conftest import ROOT
from job.model import (
    GPT,
    GPT2_VOCAB,
    PADDED_VOCAB,
    GPTConfig,
    chunked_cross_entropy,
    from_hf_state_dict,
    load_hf_into,
    sdpa_priority,
    to_hf_state_dict,
)


def hf_model(n_layer=2, n_head=4, n_embd=128, n_positions=64, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions)
    return transformers.GPT2LMHeadModel(cfg).eval()


def test_hf_state_dict_converts_to_same_logits():
    hf = hf_model()
    ours = load_hf_into(GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=128)), hf.state_dict()).eval()
    idx = torch.randint(0, GPT2_VOCAB, (3, 40))
    with torch.no_grad():
        expected = hf(idx).logits
        got, _ = ours(idx)
    assert got.shape == (3, 40, PADDED_VOCAB)
    torch.testing.assert_close(got[..., :GPT2_VOCAB], expected, atol=1e-5, rtol=0)


def test_round_trip_to_hf_layout():
    ours = GPT(GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=128)).eval()
    hf = hf_model()
    hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    idx = torch.randint(0, GPT2_VOCAB, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0][..., :GPT2_VOCAB], atol=1e-5, rtol=0)


def test_from_hf_infers_config_for_gpt2_width():
    hf = hf_model(n_layer=1, n_head=12, n_embd=768, n_positions=32)
    ours = from_hf_state_dict(hf.state_dict())
    assert (ours.config.n_layer, ours.config.n_head, ours.config.n_embd, ours.config.block_size) == (1, 12, 768, 32)


def test_parameter_names_follow_gpt2_layout():
    names = set(GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)).state_dict())
    for key in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.weight",
                "transformer.h.0.attn.c_proj.bias", "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
                "transformer.ln_f.bias", "lm_head.weight"):
        assert key in names


def test_gpt2_preset_size_and_tied_head():
    m = GPT(GPTConfig())
    assert m.lm_head.weight is m.transformer.wte.weight
    # 124M: the HF model's 124,439,808 plus the 47 padded vocabulary rows of 768.
    assert m.num_params() == 124_439_808 + (PADDED_VOCAB - GPT2_VOCAB) * 768


def test_init_statistics():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=256, n_layer=8, n_head=4, n_embd=256)
    m = GPT(cfg)
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, p in m.named_parameters():
        if name.endswith(".bias"):
            assert torch.count_nonzero(p) == 0, name
        elif "ln" in name:
            assert torch.all(p == 1), name
        elif name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
            assert p.std().item() == pytest.approx(resid_std, rel=0.05), name
        else:
            assert p.mean().abs().item() < 1e-3, name
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name


def test_padded_logits_can_never_be_sampled():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        m.lm_head.weight[GPT2_VOCAB:] = 100.0  # padded rows would win every argmax and all probability mass
    out = m.generate(torch.zeros((4, 3), dtype=torch.long), 20, top_k=1, generator=torch.Generator().manual_seed(1))
    assert out.max().item() < GPT2_VOCAB
    out = m.generate(torch.zeros((4, 3), dtype=torch.long), 20, top_k=50, generator=torch.Generator().manual_seed(1))
    assert out.max().item() < GPT2_VOCAB


def test_generate_is_reproducible_and_crops_context():
    m = GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=32)).eval()
    idx = torch.zeros((2, 5), dtype=torch.long)
    a = m.generate(idx, 12, generator=torch.Generator().manual_seed(3))
    b = m.generate(idx, 12, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 17) and torch.equal(a, b)


def test_too_long_sequence_is_rejected():
    m = GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match="block size"):
        m(torch.zeros((1, 9), dtype=torch.long))


@pytest.mark.parametrize("chunk", [64, 100, 1000])  # divides the rows, leaves a short last chunk, one chunk for all
def test_chunked_cross_entropy_equals_full_in_value_and_gradient(chunk):
    torch.manual_seed(0)
    h = torch.randn(300, 32, dtype=torch.float64, requires_grad=True)
    w = (0.1 * torch.randn(1000, 32, dtype=torch.float64)).requires_grad_()
    t = torch.randint(0, 1000, (300,))
    want = F.cross_entropy(h @ w.t(), t)
    gh, gw = torch.autograd.grad(3 * want, (h, w))  # a non-unit upstream gradient, like loss / grad_accum
    got = chunked_cross_entropy(h, w, t, chunk)
    ch, cw = torch.autograd.grad(3 * got, (h, w))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(ch, gh, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(cw, gw, rtol=1e-10, atol=1e-14)
    with torch.no_grad():  # the evaluation path prepares no gradient but gives the same value
        torch.testing.assert_close(chunked_cross_entropy(h, w, t, chunk), want, rtol=1e-12, atol=0)


# The two tests that compile C++ kernels with Inductor run with the slow tests: on a cold cache the first compile in a
# process also builds Inductor's precompiled header, about 20 s of g++ in all.
@pytest.mark.slow
def test_compiled_chunked_cross_entropy_equals_full_in_value_and_gradient():
    # Under torch.compile the gradient is one elementwise expression (a compare for the onehot), not the eager
    # path's in-place scatter: the same arithmetic, so float64 must still match the plain loss to rounding.
    torch.manual_seed(0)
    h = torch.randn(300, 32, dtype=torch.float64, requires_grad=True)
    w = (0.1 * torch.randn(1000, 32, dtype=torch.float64)).requires_grad_()
    t = torch.randint(0, 1000, (300,))
    want = F.cross_entropy(h @ w.t(), t)
    gh, gw = torch.autograd.grad(3 * want, (h, w))
    torch._dynamo.reset()
    compiled = torch.compile(chunked_cross_entropy, fullgraph=True)  # fullgraph: no silent fallback to eager
    got = compiled(h, w, t, 128)  # 128 + 128 + a short last chunk of 44
    ch, cw = torch.autograd.grad(3 * got, (h, w))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(ch, gh, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(cw, gw, rtol=1e-10, atol=1e-14)


@pytest.mark.slow
def test_compiled_chunked_loss_keeps_no_fp32_copy_of_a_chunk():
    # The loss is memory-bound on a GPU: what it costs is the passes over the (rows, vocab) logits. Compiled under
    # bf16 autocast, each chunk must be written once as bf16 logits and once as the bf16 gradient, with the fp32
    # softmax only in registers. (The eager path's scatter made Inductor write an fp32 chunk and read it back.)
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    h = torch.randn(256, 32, requires_grad=True)
    w = (0.1 * torch.randn(1000, 32)).requires_grad_()
    t = torch.randint(0, 1000, (256,))

    def loss(h, w, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return chunked_cross_entropy(h, w, t, 128)

    torch._dynamo.reset()
    _, (forward_code, *_) = run_and_get_code(torch.compile(loss, fullgraph=True), h, w, t)
    chunk_buffer = r"empty_strided_\w+\(\(128, 1000\), \(1000, 1\), torch\.{}\)"
    assert re.search(chunk_buffer.format("bfloat16"), forward_code), "the bf16 logits buffer must show (format check)"
    assert not re.search(chunk_buffer.format("float32"), forward_code), "an fp32 (rows, vocab) buffer was written"


def test_model_with_chunked_loss_matches_plain_loss_and_gradients():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    chunked = copy.deepcopy(plain)
    chunked.ce_chunk_tokens = 24  # 3 x 32 = 96 rows in 4 chunks
    idx, tgt = torch.randint(0, GPT2_VOCAB, (3, 32)), torch.randint(0, GPT2_VOCAB, (3, 32))
    logits, want = plain(idx, tgt)
    none, got = chunked(idx, tgt)
    assert logits.shape == (3, 32, PADDED_VOCAB) and none is None  # the chunked path never builds the logits
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    grads = dict(chunked.named_parameters())
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_chunked_cross_entropy_under_bf16_autocast_is_close_to_plain():
    torch.manual_seed(0)
    h = torch.randn(256, 64, requires_grad=True)
    w = (0.1 * torch.randn(2000, 64)).requires_grad_()
    t = torch.randint(0, 2000, (256,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(h, w), t)
        got = chunked_cross_entropy(h, w, t, 100)
    gh, gw = torch.autograd.grad(want, (h, w))
    ch, cw = torch.autograd.grad(got, (h, w))
    assert ch.dtype == h.dtype and cw.dtype == w.dtype
    torch.testing.assert_close(got, want.float(), rtol=1e-3, atol=0)
    assert ((ch - gh).norm() / gh.norm()).item() < 1e-2 and ((cw - gw).norm() / gw.norm()).item() < 1e-2


def attention_ops(model: GPT, idx: torch.Tensor) -> set[str]:
    with profile() as prof:
        model(idx)
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}


def test_sdpa_backend_choice_picks_the_kernel_that_runs():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, GPT2_VOCAB, (2, 32))
    want = model(idx)[0]
    for name, op in (("auto", "aten::_scaled_dot_product_flash_attention_for_cpu"), ("flash", "aten::_scaled_dot_product_flash_attention_for_cpu"),
                     ("math", "aten::_scaled_dot_product_attention_math")):
        model.set_sdpa_backend(name)
        assert attention_ops(model, idx) == {op}, name
        torch.testing.assert_close(model(idx)[0], want, rtol=1e-5, atol=1e-5)
    # After the forward pass torch's global choice is back to its own (the preference is scoped to the model).
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()


def test_sdpa_preference_keeps_the_other_kernels_as_fallbacks():
    assert sdpa_priority("auto") is None
    cudnn = sdpa_priority("cudnn")
    assert cudnn[0] == SDPBackend.CUDNN_ATTENTION
    assert set(cudnn) == {SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH}
    assert sdpa_priority("math") == [SDPBackend.MATH]  # the reference kernel: alone, always able to run


ORDER_AFTER = """
import sys, torch, torch.nn.functional as F
from job.model import GPT, GPTConfig
x = torch.zeros(1, 64, dtype=torch.long, device="cuda")
with torch.autocast("cuda", torch.bfloat16):
    if sys.argv[1] == "plain":  # torch's own choice, made at the first attention call of a process
        q = torch.zeros(1, 2, 64, 64, device="cuda")
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    else:  # the benchmark's way: a model that prefers flash runs first in the process
        model = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=128)).cuda()
        model.set_sdpa_backend("flash")
        model(x)
print(torch._C._get_sdp_priority_order())
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: torch picks its attention order lazily only there")
def test_a_kernel_preference_leaves_torchs_own_attention_order_for_later_runs():
    # On an H100 torch's own order puts cuDNN first; a flash-first context entered before torch had chosen used to
    # put FlashAttention first for the rest of the process (a later "auto" run was 4 % slower per step).
    def order(how):
        return subprocess.run([sys.executable, "-c", ORDER_AFTER, how], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    assert order("model") == order("plain")


def test_residual_dtype_keeps_the_stream_in_bf16_only_under_autocast():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, GPT2_VOCAB, (2, 16))
    seen = []
    for block in model.transformer.h:
        block.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))

    def stream(residual, autocast):
        seen.clear()
        model.residual_dtype = residual
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits, _ = model(idx)
        return set(seen), logits

    assert stream(None, True)[0] == {torch.float32}  # build-nanogpt: autocast leaves the residual stream fp32
    got, logits = stream(torch.bfloat16, True)
    assert got == {torch.bfloat16}
    torch.testing.assert_close(logits.float(), stream(None, True)[1].float(), rtol=0.05, atol=0.05)
    assert stream(torch.bfloat16, False)[0] == {torch.float32}  # no autocast: nothing to match, the setting is inert
