"""Hugging Face GPT-2 model directories: write one from our GPT, and read one back into it (`--init-from hf:DIR`).

A directory holds what `transformers.GPT2LMHeadModel.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
read, offline: config.json, model.safetensors (HF's layout: Conv1D weights transposed, the vocabulary cut back from
the padded 50,304 rows to GPT-2's 50,257, lm_head tied to wte), generation_config.json, and the GPT-2 tokenizer
(vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) derived from the very tiktoken encoding
the trainer uses. Writing them needs only torch and safetensors, not transformers.

This is the format alone: it reads no checkpoint, config or recipe. job.export writes a checkpoint's model in it,
job.config checks --init-from with it, and the gpt2 recipe loads the weights with it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from job.errors import SettingsMismatch, UserError
from job.fsutil import write_failure
from job.tokenizer import EOT, get_encoding
from job.tokenizer import VOCAB_SIZE as GPT2_VOCAB

if TYPE_CHECKING:
    from job.model import GPTConfig

# torch is imported where it is used: job.export and job.config read the command line with this module imported, and
# a mistake there is reported before torch's seconds-long import.
EOT_TEXT = "<|endoftext|>"
DTYPES = ("float32", "bfloat16", "float16")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
OUTPUT_FILES = ("config.json", "generation_config.json", "model.safetensors", *TOKENIZER_FILES, "README.md")


# --- tokenizer files -------------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: vocab.json and merges.txt spell tokens with these characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):  # the other bytes (control characters, space, ...) move to code points 256 and up
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def gpt2_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """vocab.json and merges.txt contents, recovered from tiktoken's token -> rank table.

    A token's rank is the order in which BPE training created it, so the merge that made a token of rank r is the
    split that BPE itself reaches on the token's bytes using only merges of rank < r. This is tested to give back
    OpenAI's original encoder.json and vocab.bpe exactly.
    """
    enc = get_encoding()
    ranks: dict[bytes, int] = enc._mergeable_ranks  # tiktoken has no public accessor for the rank table
    spell = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(spell[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[EOT_TEXT] = EOT
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of two earlier tokens")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    return vocab, merges


def tokenizer_files(max_length: int) -> dict[str, str]:
    vocab, merges = gpt2_vocab_and_merges()
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    config = {
        "tokenizer_class": "GPT2Tokenizer", **special, "add_prefix_space": False, "add_bos_token": False,
        "errors": "replace", "model_max_length": max_length, "clean_up_tokenization_spaces": False,
        # <|endoftext|> is a special token (id 50256) for HF, as in OpenAI's GPT-2 tokenizer
        "added_tokens_decoder": {str(EOT): {"content": EOT_TEXT, "lstrip": False, "normalized": True, "rstrip": False,
                                            "single_word": False, "special": True}},
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }


# --- model files -----------------------------------------------------------------------------------------

def hf_config(cfg: GPTConfig, dtype: str = "float32") -> dict:
    """GPT2Config fields for our architecture: GELU (tanh) = gelu_new, LayerNorm eps 1e-5, tied embeddings."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": GPT2_VOCAB, "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        # no dropout: the model was trained without it, so fine-tuning in transformers continues the same model
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "summary_first_dropout": 0.0,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "bos_token_id": EOT, "eos_token_id": EOT, "tie_word_embeddings": True, "use_cache": True, "dtype": dtype,
    }


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def hf_weights(model, dtype: str) -> dict:
    import torch

    from job.model import to_hf_state_dict

    cast = getattr(torch, dtype)
    weights = {k: v.to(cast).contiguous() for k, v in to_hf_state_dict(model).items()}
    del weights["lm_head.weight"]  # tied to transformer.wte.weight; HF re-ties it on load (tie_word_embeddings)
    return weights


def export_files(model, ckpt: dict, path, dtype: str) -> dict[str, str]:
    """The text files of the export: configs, tokenizer, and a README that says where the weights came from."""
    cfg = model.config
    return {
        "config.json": json.dumps(hf_config(cfg, dtype), indent=2),
        "generation_config.json": json.dumps({"bos_token_id": EOT, "eos_token_id": EOT}, indent=2),
        **tokenizer_files(cfg.block_size),
        "README.md": (
            f"# GPT-2 ({model.num_params() / 1e6:.1f}M parameters) trained with nanogpt-cloud\n\n"
            f"Exported by `python -m job.export` from `{Path(path).name}` (step {ckpt.get('step')}, val loss {ckpt.get('val_loss')}).\n"
            f"{cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, context {cfg.block_size} tokens, "
            "GPT-2 tokenizer.\n\n```python\nfrom transformers import AutoTokenizer, GPT2LMHeadModel\n"
            "model = GPT2LMHeadModel.from_pretrained(DIR)\ntokenizer = AutoTokenizer.from_pretrained(DIR)\n```\n"
        ),
    }


def write_export(out: Path, weights: dict, files: dict) -> None:
    """Everything is written to a temp dir next to --out first: a failure half-way leaves --out as it was."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    need = sum(t.nbytes for t in weights.values()) + sum(len(t) for t in files.values())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot write the export to {out}: {write_failure(e, out.parent, need)}") from e
    try:
        _write_export(tmp, out, weights, files, save_file)
    except (OSError, SafetensorError) as e:  # how a full disk or a refused write comes out; anything else is a bug
        shutil.rmtree(tmp, ignore_errors=True)  # first, so the free space is what a retry would have
        raise UserError(f"cannot write the export to {out}: {write_failure(e, out.parent, need)}; --out is as it was") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_export(tmp: Path, out: Path, weights: dict, files: dict, save_file) -> None:
    """Write everything into `tmp`, then move it to `out` (whole, or file by file where `out` exists)."""
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # HF refuses files without format=pt
    for name, text in files.items():
        _write_text(tmp / name, text)
    umask = os.umask(0)
    os.umask(umask)
    for name in OUTPUT_FILES:  # mkdtemp and safetensors create owner-only files; an export is meant to be shared
        os.chmod(tmp / name, 0o666 & ~umask)
    os.chmod(tmp, 0o777 & ~umask)
    if not out.exists():
        os.replace(tmp, out)
    else:
        for name in OUTPUT_FILES:  # file by file: other files a user keeps in --out stay
            os.replace(tmp / name, out / name)


# --- reading one: --init-from hf:DIR ---------------------------------------------------------------------

def resolve_hf_dir(spec: str) -> Path:
    """`hf:DIR` (or a bare DIR) -> a local directory holding config.json and weights; never downloads."""
    name = spec[3:] if spec.startswith("hf:") else spec
    d = Path(name).expanduser()
    if not d.is_dir():
        try:  # a hub id like gpt2 or openai-community/gpt2, but only if it was downloaded before: this never downloads
            from huggingface_hub import snapshot_download

            cached = Path(snapshot_download(name, local_files_only=True))
        except Exception:
            cached = None
        if cached is None:
            raise UserError(f"--init-from {spec}: {name} is not a local directory (and not in the Hugging Face cache): it must be "
                            "a directory with config.json and model.safetensors, e.g. one written by `python -m job.export`")
        d = cached
    if not (d / "config.json").is_file():
        raise UserError(f"--init-from {spec}: {d} has no config.json: pass a Hugging Face GPT-2 model directory")
    if not any((d / w).is_file() for w in WEIGHT_FILES):
        raise UserError(f"--init-from {spec}: {d} has no {' or '.join(WEIGHT_FILES)}: pass a Hugging Face GPT-2 model directory")
    return d


def read_hf_config(d: Path, spec: str) -> dict:
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"--init-from {spec}: cannot read {d / 'config.json'} ({e})") from e
    if not isinstance(cfg, dict):
        raise UserError(f"--init-from {spec}: {d / 'config.json'} holds a JSON {type(cfg).__name__}, not a model's settings: "
                        "pass a Hugging Face GPT-2 model directory")
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise UserError(f"--init-from {spec}: {d / 'config.json'} has layer_norm_epsilon {eps!r}, not a number: "
                        "pass a Hugging Face GPT-2 model directory")
    if cfg.get("model_type") != "gpt2":
        raise UserError(f"--init-from {spec}: model_type is {cfg.get('model_type')!r}, not 'gpt2': only GPT-2 models can be loaded")
    plain = (cfg.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")
             and cfg.get("n_inner") in (None, 4 * cfg.get("n_embd", 0))
             and not cfg.get("scale_attn_by_inverse_layer_idx") and cfg.get("scale_attn_weights", True)
             and abs(cfg.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12)
    if not plain:
        raise UserError(f"--init-from {spec}: {d / 'config.json'} is a GPT-2 variant this trainer does not implement "
                        "(activation, n_inner, attention scaling or layer norm eps differ)")
    return cfg


def check_init_from(spec: str, model_cfg: GPTConfig) -> Path:
    """Validate --init-from against this run's model (before any data or GPU is touched); returns the directory. A model
    of another shape is every difference at once, with the settings that fit it (SettingsMismatch)."""
    d = resolve_hf_dir(spec)
    cfg = read_hf_config(d, spec)
    sizes = {"n_layer": cfg.get("n_layer"), "n_head": cfg.get("n_head"), "n_embd": cfg.get("n_embd"),
             "n_positions": cfg.get("n_positions", 1024), "vocab_size": cfg.get("vocab_size", GPT2_VOCAB)}
    if bad := [k for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v <= 0]:
        raise UserError(f"--init-from {spec}: {d / 'config.json'} has no valid {', '.join(bad)}: pass a Hugging Face GPT-2 model directory")
    shape = {k: sizes[k] for k in ("n_layer", "n_head", "n_embd")}
    ours = {k: getattr(model_cfg, k) for k in shape}
    problems, settings = [], {}
    if shape != ours:
        problems.append(f"that model has {_shape_words(shape)}; this run's has {_shape_words(ours)}")
        settings.update({k: v for k, v in shape.items() if ours[k] != v})
    if sizes["n_positions"] < model_cfg.block_size:
        problems.append(f"it has {sizes['n_positions']} positions, fewer than this run's block size {model_cfg.block_size}")
        settings["block_size"] = sizes["n_positions"]
    if sizes["vocab_size"] > model_cfg.vocab_size:
        problems.append(f"its vocabulary ({sizes['vocab_size']}) is larger than this run's {model_cfg.vocab_size}")
        settings["vocab_size"] = sizes["vocab_size"]
    if problems:
        raise SettingsMismatch(f"--init-from {spec}: {'; '.join(problems)}", settings,
                               "pass a model directory of this run's shape, or leave out --init-from")
    return d


def _shape_words(shape: dict) -> str:
    def count(n, word):
        return f"{n} {word}{'' if n == 1 else 's'}"

    return f"{count(shape['n_layer'], 'layer')}, {count(shape['n_head'], 'head')}, width {shape['n_embd']}"


def read_hf_weights(d: Path) -> dict:
    """The state dict of an HF GPT-2 directory, keys as GPT2LMHeadModel names them (transformer.*, lm_head.weight)."""
    import torch

    path = d / "model.safetensors"
    try:
        if path.is_file():
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            path = d / "pytorch_model.bin"
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, or not a weights file: safetensors, pickle and zip each raise their own
        raise UserError(f"{path} cannot be read ({type(e).__name__}): it is damaged or not a weights file; download "
                        "or export the model again") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError(f"{path} does not hold named tensors: download or export the model again")
    # OpenAI's GPT-2 weights on the hub were saved from GPT2Model: no "transformer." prefix
    return {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v.float() for k, v in sd.items()}


def init_from_hf(model, spec: str):
    """Load the weights of `spec` (hf:DIR) into `model` (whose shape check_init_from already accepted)."""
    from job.model import load_hf_into

    d = check_init_from(spec, model.config)
    try:
        return load_hf_into(model, read_hf_weights(d))
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--init-from {spec}: the weights in {d} do not fit this model: {e}") from e
