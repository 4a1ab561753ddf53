"""HellaSwag acc_norm: rendering, scoring against a slow reference, a model that knows the answers, DDP, download."""

from __future__ import annotations

import functools
import http.server
import json
import random
import threading

import pytest
import torch
import torch.multiprocessing as mp

from conftest import CORPUS
from job import hellaswag
from job.errors import UserError
from job.model import GPT, GPT2_VOCAB, PADDED_VOCAB, GPTConfig
from job.tokenizer import EOT, encode


def row(ctx: str, endings: list[str], label: int) -> dict:
    return {"ctx": ctx, "endings": endings, "label": label}


ROWS = [
    row("A man is sitting on a roof. He", ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                         "is holding a rubik's cube.", "starts pulling up roofing on a roof."], 3),
    row("She pours the batter", ["into the pan.", "on the dog", "out", "and then, slowly, the whole kitchen sings."], 0),
    row("Look:", ["A cat sleeps.", "Dogs bark loudly at night.", "x", "The sun rises over the quiet hills."], 2),
    # Longer than block_size 64 once tokenized, with endings of different lengths: must be cropped per row.
    row("The history of the region is long and complicated. " * 8 + "Finally, the",
        ["king returned.", "people built a new city by the river, with walls, towers and a great market.", "end.", "rain"], 1),
    row("Two kids play", ["chess in the park while their parents watch from a bench nearby.", "tag.", "a game", "!"], 1),
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def small_model(seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(block_size=64, n_layer=2, n_head=2, n_embd=32), **kw})).eval()


# --- rendering ---------------------------------------------------------------------------------------
def test_render_example_matches_the_tokenizer():
    ex = ROWS[0]
    tokens, mask, label = hellaswag.render_example(ex)
    ctx = encode(ex["ctx"])
    ends = [encode(" " + e) for e in ex["endings"]]
    L = len(ctx) + max(map(len, ends))
    assert tokens.shape == mask.shape == (4, L) and tokens.dtype == mask.dtype == torch.long and label == 3
    for i, end in enumerate(ends):
        n = len(ctx) + len(end)
        assert tokens[i, :n].tolist() == ctx + end and tokens[i, n:].eq(0).all()
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (L - n)


# --- scoring -----------------------------------------------------------------------------------------
def reference_score(model, example) -> int:
    """Slow and independent: one forward per ending, mean NLL of the ending tokens seen in the last block_size tokens."""
    T = model.config.block_size
    ctx = encode(example["ctx"])
    means = []
    for end in example["endings"]:
        seq = (ctx + encode(" " + end))[-T:]
        n_end = min(len(encode(" " + end)), len(seq) - 1)  # the first token of the window has nothing to predict it
        logits, _ = model(torch.tensor([seq]))
        logp = torch.log_softmax(logits[0, :, :GPT2_VOCAB].double(), dim=-1)
        nll = [-logp[t - 1, seq[t]].item() for t in range(len(seq) - n_end, len(seq))]
        means.append(sum(nll) / len(nll))
    return min(range(len(means)), key=means.__getitem__)


@torch.no_grad()
@pytest.mark.slow  # a model scored example by example against a slow reference: seconds, kept out of the edit loop
def test_score_example_matches_a_slow_reference():
    assert len(encode(ROWS[3]["ctx"])) > 64
    seen = set()
    for seed in range(4):
        model = small_model(seed)
        for ex in ROWS:
            tokens, mask, _ = hellaswag.render_example(ex)
            got = hellaswag.score_example(model, tokens, mask)
            assert got == reference_score(model, ex), (seed, ex["ctx"][:30])
            seen.add(got)
    assert len(seen) > 1  # the comparison is not trivially "always 0"


@torch.no_grad()
def test_padded_vocab_columns_are_ignored():
    model = small_model()
    tokens, mask, _ = hellaswag.render_example(ROWS[1])
    want = hellaswag.score_example(model, tokens, mask)
    # A huge logit on a padded column would dominate the softmax if those columns were included.
    model.lm_head.weight.data[GPT2_VOCAB:] = 0
    model.lm_head.weight.data[GPT2_VOCAB:, 0] = 1e4
    model.transformer.ln_f.bias.data[0] = 1.0
    assert hellaswag.score_example(model, tokens, mask) == want


# --- a model that knows the answers ------------------------------------------------------------------
SENTENCES = [
    ("The quick brown fox jumps over", "the lazy dog near the river."),
    ("My grandmother bakes fresh bread", "every Sunday morning before church."),
    ("The old sailor told the children", "stories about storms at sea."),
    ("Rain fell softly on", "the tin roof all night long."),
    ("After school the boys played", "football in the muddy park."),
    ("Alice opened the wooden door", "and saw a garden full of roses."),
]


@pytest.fixture(scope="module")
def trained_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64))
    docs = [[EOT] + encode(f"{a} {b}") for a, b in SENTENCES]
    rng = random.Random(0)
    stream = [t for _ in range(60) for doc in rng.sample(docs, len(docs)) for t in doc]
    stream = torch.tensor(stream)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    B, T = 4, 32
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        ix = torch.randint(len(stream) - T - 1, (B,), generator=gen)
        x = torch.stack([stream[i : i + T] for i in ix])
        y = torch.stack([stream[i + 1 : i + T + 1] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.5, loss.item()
    return model.eval()


def knowledge_rows() -> list[dict]:
    rows = []
    for i, (ctx, right) in enumerate(SENTENCES):
        # Distractors are the other sentences' endings: words the model has seen, in the wrong place.
        others = [b for j, (_, b) in enumerate(SENTENCES) if j != i][:3]
        label = i % 4
        rows.append(row(ctx, others[:label] + [right] + others[label:], label))
    return rows


@pytest.mark.slow  # trains a model first (its fixture)
def test_trained_model_knows_the_right_endings(trained_model, tmp_path):
    examples = hellaswag.load_examples(path=write_jsonl(tmp_path / "known.jsonl", knowledge_rows()))
    assert sorted({ex["label"] for ex in examples}) == [0, 1, 2, 3]
    trained_model.train()
    assert hellaswag.evaluate(trained_model, examples, "cpu") == (len(SENTENCES), len(SENTENCES))
    assert trained_model.training  # the mode it came in with is restored
    untrained = small_model(0, block_size=32, n_embd=64).train(False)
    correct, total = hellaswag.evaluate(untrained, examples, "cpu")
    assert total == len(SENTENCES) and correct < total
    assert not untrained.training
    assert hellaswag.evaluate(trained_model, examples, "cpu", autocast_dtype=torch.bfloat16)[1] == len(SENTENCES)
    assert hellaswag.evaluate(trained_model, examples, "cpu", limit=2) == (2, 2)


# --- DDP ---------------------------------------------------------------------------------------------
def _ddp_worker(rank, world, init_file, data, state, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
        model.load_state_dict(torch.load(state, weights_only=True))
        result = hellaswag.evaluate(model, hellaswag.load_examples(path=data), "cpu", rank=rank, world=world)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        torch.distributed.destroy_process_group()


def test_evaluate_over_two_ranks_gives_every_rank_the_global_totals(tmp_path):
    rows = ROWS + knowledge_rows()[:2]  # 7 examples: the ranks get 4 and 3
    data = write_jsonl(tmp_path / "val.jsonl", rows)
    model = small_model(3)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    want = hellaswag.evaluate(model, hellaswag.load_examples(path=data), "cpu")
    assert want[1] == 7
    mp.spawn(_ddp_worker, args=(2, tmp_path / "rdzv", data, tmp_path / "model.pt", tmp_path / "result"), nprocs=2)
    for rank in range(2):
        assert tuple(json.loads((tmp_path / f"result.{rank}").read_text())) == want


# --- download and bad files --------------------------------------------------------------------------
class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_offline_download_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as e:
        hellaswag.load_examples(cache_dir=tmp_path / "cache", url="http://127.0.0.1:9/nope.jsonl", timeout=5)
    msg = str(e.value)
    assert "\n" not in msg and "--hellaswag-path" in msg and "--hellaswag-every 0" in msg and "127.0.0.1:9" in msg
    assert str(tmp_path / "cache" / "hellaswag_val.jsonl") in msg
    assert not any((tmp_path / "cache").iterdir())  # no half file left behind


def test_download_lands_in_the_cache_and_is_reused(tmp_path):
    served = tmp_path / "www"
    served.mkdir()
    write_jsonl(served / "hellaswag_val.jsonl", ROWS)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    cache = tmp_path / "cache"
    try:
        with pytest.raises(UserError, match="HTTP Error 404"):
            hellaswag.load_examples(cache_dir=cache, url=f"{base}/missing.jsonl")
        assert hellaswag.load_examples(cache_dir=cache, url=f"{base}/hellaswag_val.jsonl") == ROWS
    finally:
        server.shutdown()
        server.server_close()
    assert sorted(p.name for p in cache.iterdir()) == ["hellaswag_val.jsonl"]
    assert hellaswag.load_examples(cache_dir=cache, url=f"{base}/hellaswag_val.jsonl") == ROWS  # server gone: from the cache


@pytest.mark.parametrize("content, needle", [
    (None, "cannot read"),
    ("", "no examples"),
    (json.dumps(ROWS[0]) + "\n{not json\n", "line 2 is not JSON"),
    (json.dumps({"ctx": "a", "endings": ["b", "c"]}) + "\n", "line 1 lacks"),
    (json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 2}) + "\n", "line 1 lacks"),
    (json.dumps({"ctx": "a", "endings": "bcde", "label": 0}) + "\n", "line 1 lacks"),
    ("\n" + json.dumps(["a", "b"]) + "\n", "line 2 lacks"),
])
def test_bad_local_file_is_a_user_error(tmp_path, content, needle):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError) as e:
        hellaswag.load_examples(path=str(path))
    msg = str(e.value)
    assert needle in msg and str(path) in msg and "\n" not in msg


@pytest.mark.slow  # every example scored in batches and one at a time: seconds, kept out of the edit loop
def test_batched_predictions_equal_one_example_at_a_time():
    """Examples of different lengths (and numbers of endings) share padded batches: each pick must stay its own."""
    torch.manual_seed(3)
    model = GPT(GPTConfig(block_size=48, vocab_size=PADDED_VOCAB, n_layer=2, n_head=2, n_embd=32)).eval()
    lines = [ln for ln in CORPUS.read_text().splitlines() if len(ln.split()) >= 4]
    examples = []
    for i in range(23):
        endings = [lines[(7 * i + 11 * k) % len(lines)] for k in range(3 + i % 2)]
        examples.append({"ctx": " ".join(lines[5 * i : 5 * i + 1 + i % 6]), "endings": endings, "label": i % 3})
    with torch.no_grad():
        one_by_one = [hellaswag.score_example(model, *hellaswag.render_example(ex)[:2]) for ex in examples]
        for batch in (1, 4, 16, 64):
            assert hellaswag.predict(model, examples, "cpu", batch_examples=batch).tolist() == one_by_one
    assert len(set(one_by_one)) > 1  # the picks differ between examples: a mix-up would show
