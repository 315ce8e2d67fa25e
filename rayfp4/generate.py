"""``python -m rayfp4.generate PATH --prompt TEXT``: sample text from a trained checkpoint.

PATH is a variant folder, a checkpoint folder, or a run folder with ``--variant`` when it has
several (:mod:`rayfp4.train.trained`). The prompt is tokenized with the run's tokenizer, the model
continues it one token at a time through a KV cache (:mod:`rayfp4.model.generation`), and the
prompt and its continuation are printed as text. Sampling stops after ``--max-tokens`` tokens or at
the end-of-text token. ``--temperature 0`` is greedy; ``--top-k`` keeps the k most likely tokens;
``--seed`` makes a sample repeatable. ``--precision trained`` (default) runs the model as it
trained (its precision policy), ``bf16`` without quantization.

Exit codes: 0 done, 2 bad input (a path that is not a run, an unknown variant, a checkpoint that
does not load, an empty prompt, a negative temperature), one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rayfp4.generate", description="Sample text from a trained checkpoint.")
    p.add_argument("path", help="a variant folder, a checkpoint folder, or a run folder (with --variant)")
    p.add_argument("--variant", help="the variant of a run with several")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-tokens", type=int, default=200, help="tokens to generate at most (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens; 0: all (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--precision", choices=("trained", "bf16"), default="trained",
                   help="run the model as trained (its precision policy) or in BF16 (default trained)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--backend", choices=("auto", "reference", "triton", "cutlass"),
                   help="GEMM backend of the trained precision (default: the run's)")
    return p


class GenerateInputError(ValueError):
    """A generation setting that cannot work (named in the message)."""


def _check(args) -> None:
    if not args.prompt:
        raise GenerateInputError("--prompt is empty: give the text to continue")
    if args.max_tokens <= 0:
        raise GenerateInputError(f"--max-tokens must be positive, got {args.max_tokens}")
    if not args.temperature >= 0:  # also refuses NaN
        raise GenerateInputError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if args.top_k < 0:
        raise GenerateInputError(f"--top-k must be 0 (all tokens) or positive, got {args.top_k}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .train.trained import run_command

    def action() -> str:
        _check(args)
        return generate_text(args)

    return run_command(action, GenerateInputError)


def generate_text(args) -> str:
    """The prompt and its sampled continuation, as text."""
    import torch

    from .model.generation import generate
    from .train.trained import in_precision, load_model, locate_one, pick_device, precision_label, run_shards

    device = pick_device(args.device)
    variant, checkpoint = locate_one(args.path, args.variant)
    tokenizer = run_shards(variant).tokenizer()
    prompt = [int(i) for i in tokenizer.encode_batch([args.prompt])[0]]
    if not prompt:
        raise GenerateInputError("--prompt encodes to no tokens")
    window = variant.config.model.seq_len
    if len(prompt) > window:
        print(f"[generate] the prompt has {len(prompt)} tokens; the model sees its last {window}", file=sys.stderr)
    trained = load_model(variant, checkpoint, device, warn=lambda m: print(f"[generate] {m}", file=sys.stderr))
    model, autocast = in_precision(trained, args.precision, args.backend)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.monotonic()
    out = generate(model, prompt, args.max_tokens, temperature=args.temperature, top_k=args.top_k, generator=gen,
                   stop_id=tokenizer.eot_id, vocab_size=tokenizer.vocab_size, autocast=autocast)
    took = time.monotonic() - start
    why = "end of text" if out and out[-1] == tokenizer.eot_id else f"--max-tokens {args.max_tokens}"
    print(f"[generate] {variant.name} {trained.checkpoint.name} (step {trained.step}), "
          f"{precision_label(variant, args.precision)}: {len(out)} tokens in {took:.1f} s, stopped at {why}",
          file=sys.stderr, flush=True)
    return tokenizer.decode(prompt + out)


if __name__ == "__main__":
    sys.exit(main())
