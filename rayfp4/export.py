"""``python -m rayfp4.export PATH --out DIR``: a trained checkpoint as a Hugging Face Llama model.

PATH is a variant folder, a checkpoint folder, or a run folder with ``--variant`` when it has
several (:mod:`rayfp4.train.trained`). DIR receives what ``transformers`` loads with
``AutoModelForCausalLM.from_pretrained(DIR)`` / ``AutoTokenizer.from_pretrained(DIR)``, no custom
code (the conversion is :mod:`rayfp4.model.hf_llama`):

- ``config.json`` (``LlamaForCausalLM``) and ``model.safetensors``, in ``--dtype`` (default
  float32: the FP32 master weights as trained);
- ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``: the run's tokenizer
  (the byte tokenizer as an equivalent byte-level BPE with no merges); its end-of-text token is
  both ``eos`` and ``bos`` (training put it before every document but the first);
- ``rayfp4.json``: where it came from (run, variant, checkpoint, step, the run's fingerprint).

With ``--nvfp4`` (an NVFP4 variant only), ``nvfp4.safetensors`` also holds the weights of the
linears the variant's policy quantized, as its forward pass used them: quantized from the FP32
weight with round-to-nearest-even in the policy's weight tiles (16x16 with 2-D weight scaling,
else 1x16). Per Llama weight ``W`` [rows, K], under its Hugging Face name:

- ``W.weight_packed``: uint8 [rows, K/2], two E2M1 codes a byte, element 2j in the low nibble
  (codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign);
- ``W.weight_scale``: float8_e4m3fn [rows, K/16], the decode scale of each row's block of 16
  (with 16x16 tiles, the 16 rows of a tile carry the tile's scale);
- ``W.weight_amax``: float32 [], the tensor amax; the value of element (r, c) is
  ``(e2m1(code) * float(scale[r, c // 16])) * (amax / 2688)`` in FP32.

Rows follow the Llama weight (Q and K rows reordered for its rotary layout, as in
``model.safetensors``); Q, K and V share the amax of our fused QKV weight, gate and up that of the
fused gate/up weight.

Needs ``safetensors`` (the ``hf`` extra: ``pip install -e '.[hf]'``); ``transformers`` only to load
the result. Exit codes: 0 written, 2 bad input (one line on stderr). DIR is written whole or not
at all (a temporary sibling renamed into place); an existing non-empty DIR needs ``--force``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

MISSING_SAFETENSORS = ("export needs the safetensors package, part of the hf extra: "
                       "pip install -e '.[hf]' (or pip install safetensors)")


class ExportInputError(ValueError):
    """An export that cannot be done as asked (named in the message)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayfp4.export",
                                description="Export a trained checkpoint to Hugging Face Llama format.")
    p.add_argument("path", help="a variant folder, a checkpoint folder, or a run folder (with --variant)")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--variant", help="the variant of a run with several")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of model.safetensors (default float32, the master weights)")
    p.add_argument("--nvfp4", action="store_true", help="also write nvfp4.safetensors (the 4-bit weights)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .train.trained import run_command

    return run_command(lambda: f"[export] wrote {export(args)}", ExportInputError)


def export(args) -> Path:
    """Write the export ``args`` ask for; returns the folder."""
    import torch

    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ExportInputError(MISSING_SAFETENSORS) from None
    from .model.hf_llama import hf_llama_config, hf_llama_state_dict
    from .train.trained import load_model, locate_one, run_shards

    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise ExportInputError(f"--out {out}: exists and is not an empty folder (--force replaces it)")
    variant, checkpoint = locate_one(args.path, args.variant)
    if args.nvfp4 and variant.config.precision.format != "nvfp4":
        raise ExportInputError(f"--nvfp4: variant {variant.name} trained in {variant.config.precision.format}, "
                               f"not nvfp4; it has no 4-bit weights to export")
    if args.nvfp4 and variant.config.precision.selection_for("fprop.w") != "max6":
        raise ExportInputError(f"--nvfp4: variant {variant.name} quantized its weights with precision.scale_selection "
                               f"four_over_six, whose values are e2m1 * scale * amax / (6 * "
                               f"{variant.config.precision.scale_selection_cap}); the nvfp4.safetensors layout "
                               f"decodes with amax / 2688 only")
    tokenizer = run_shards(variant).tokenizer()
    trained = load_model(variant, checkpoint, "cpu", warn=lambda m: print(f"[export] {m}", file=sys.stderr))
    cfg = variant.config
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        config = hf_llama_config(cfg.model, eos_token_id=tokenizer.eot_id, bos_token_id=tokenizer.eot_id,
                                 dtype=args.dtype)
        _write_json(tmp / "config.json", config)
        save_file(hf_llama_state_dict(trained.model, dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "tokenizer.json").write_text(tokenizer.to_hf_json())
        eot = tokenizer.eot_token
        _write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
            "model_max_length": cfg.model.seq_len, "clean_up_tokenization_spaces": False})
        _write_json(tmp / "special_tokens_map.json", {"bos_token": eot, "eos_token": eot})
        files = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"]
        if args.nvfp4:
            save_file(nvfp4_weights(trained), str(tmp / "nvfp4.safetensors"),
                      metadata={"format": "pt", "rayfp4.layout": "see rayfp4/export.py: weight_packed (E2M1 pairs, "
                                "low nibble first), weight_scale (E4M3 per row and 16 columns), weight_amax "
                                "(value = e2m1 * scale * amax / 2688)"})
            files.append("nvfp4.safetensors")
        _write_json(tmp / "rayfp4.json", {
            "run": str(variant.path.parent), "variant": variant.name, "checkpoint": str(trained.checkpoint),
            "step": trained.step, "dtype": args.dtype, "tokenizer": tokenizer.describe(), "files": files,
            "fingerprint": variant.fingerprint})
        for f in tmp.glob("*.safetensors"):  # safetensors creates its files owner-only; the rest are not
            os.chmod(f, (tmp / "config.json").stat().st_mode & 0o777)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def nvfp4_weights(trained) -> dict:
    """The quantized linears' NVFP4 weights under their Llama names (layout: the module docstring)."""
    import copy

    import torch

    from .formats import nvfp4
    from .model.hf_llama import hf_names_of_linear, rope_halves_order
    from .precision import apply_precision_policy

    cfg = trained.variant.config
    model = copy.deepcopy(trained.model)
    summary = apply_precision_policy(model, cfg.precision.model_copy(update={"backend": "reference"}),
                                     seed=cfg.train.seed, total_steps=cfg.train.steps)
    modules = dict(model.named_modules())
    order = rope_halves_order(cfg.model.head_dim)
    out = {}
    for name in summary.quantized:
        layer = modules[name]
        # What the forward pass computes for its weight operand (QuantizedLinear, role fprop.w).
        q = nvfp4.quantize(layer.weight.detach().float(), tile=layer.roles.fprop_w.tile, rounding="nearest")
        for hf, r0, r1 in hf_names_of_linear(cfg.model, name):
            packed, scale = q.data[r0:r1], q.scale[r0:r1]
            if hf.endswith(("q_proj.weight", "k_proj.weight")):
                heads = (r1 - r0) // cfg.model.head_dim
                packed = packed.view(heads, cfg.model.head_dim, -1)[:, order].reshape(r1 - r0, -1)
                scale = scale.view(heads, cfg.model.head_dim, -1)[:, order].reshape(r1 - r0, -1)
            base = hf.removesuffix(".weight")
            out[f"{base}.weight_packed"] = packed.contiguous().clone()
            out[f"{base}.weight_scale"] = scale.contiguous().clone()
            out[f"{base}.weight_amax"] = q.amax.reshape(()).clone().to(torch.float32)
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing what is there (--force was given)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


if __name__ == "__main__":
    sys.exit(main())
