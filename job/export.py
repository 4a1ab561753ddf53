"""Export a checkpoint as a Hugging Face GPT-2 model directory, and read one back (`--init-from hf:DIR`).

    python -m job.export --checkpoint LOGDIR_OR_model_XXXXX.pt --out DIR [--dtype float32|bfloat16|float16] [--overwrite]

This is the command: the directory's format, and reading one back for --init-from, are job/hf.py's.
"""

from __future__ import annotations

from pathlib import Path

from job.errors import ArgumentParser, UserError, check_output_path, cli_main
from job.hf import DTYPES, OUTPUT_FILES, export_files, hf_weights, write_export

# torch is imported where it is used (job.checkpoint): a mistake on the command line is reported before its
# seconds-long import.


def export(checkpoint, out_dir, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the HF model directory for a checkpoint (file, or log dir = its newest); returns the directory."""
    from job.checkpoint import checkpoint_recipe, load_model, resolve_checkpoint

    out = check_out_dir(out_dir, dtype, overwrite)
    path = resolve_checkpoint(checkpoint)
    model, ckpt = load_model(path, "cpu")
    recipe = checkpoint_recipe(ckpt)
    if recipe != "gpt2":  # checked before anything is written: the out dir stays as it was
        raise UserError(f"{path} was trained with --recipe {recipe}, whose model (rotary positions, ReLU², value embeddings, "
                        "skips) has no transformers class to load it: sample it with `python -m job.sample --checkpoint "
                        f"{path}` instead")
    weights = hf_weights(model, dtype)
    files = export_files(model, ckpt, path, dtype)
    write_export(out, weights, files)
    size = (out / "model.safetensors").stat().st_size
    print(f"exported {path} (step {ckpt.get('step')}, val loss {ckpt.get('val_loss')}) to {out}: "
          f"{model.num_params() / 1e6:.1f}M parameters, {dtype}, model.safetensors {size / 2**20:.1f} MiB")
    return out


def check_out_dir(out_dir, dtype: str, overwrite: bool) -> Path:
    """--out as a Path, refused before any work when it cannot take the export or would lose an earlier one."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory: choose another --out")
    check_output_path(out, "--out", directory=True)
    clash = [name for name in OUTPUT_FILES if (out / name).exists()]
    if clash and not overwrite:
        raise UserError(f"--out {out} already holds {', '.join(clash)}: pass --overwrite to replace them or choose another --out")
    return out


@cli_main
def main(argv: list[str] | None = None) -> Path:
    p = ArgumentParser(prog="python -m job.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a model_*.pt file, or a log dir (its newest checkpoint)")
    p.add_argument("--out", required=True, help="directory to write the Hugging Face model to")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights' dtype in model.safetensors (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in --out")
    args = p.parse_args(argv)
    return export(args.checkpoint, args.out, args.dtype, args.overwrite)


if __name__ == "__main__":
    main()
