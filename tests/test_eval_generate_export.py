"""eval, generate and export on a real run of the default job (configs/tiny.yaml, shortened): both
variants trained once for the module, the BF16-format one with FSDP2 on two workers, so that its
checkpoint is sharded (shards/, torch.distributed.checkpoint) and the NVFP4 one whole (state.pt)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rayfp4.tracking import read_metrics
from conftest import mlflow_uri

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
VARIANTS = ("[{name: fp32, set: {precision.format: bf16, precision.bf16_last_blocks: 0, scaling.strategy: fsdp2}}, "
            "{name: nvfp4, set: {precision.format: nvfp4, precision.bf16_last_blocks: 1}}]")


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    from rayfp4.run import main

    tmp = tmp_path_factory.mktemp("trained")
    settings = ["train.steps=4", "train.val_every=0", "checkpoint.every=0", "data.val_sequences=8", "model.n_layers=2",
                "optim.warmup_steps=2", "train.log_every=2", f"output_dir={tmp / 'runs'}", "name=fx",
                f"tracking.uri={mlflow_uri(tmp)}", f"variants={VARIANTS}", "baseline=fp32"]
    assert main([TINY, *[a for s in settings for a in ("--set", s)]]) == 0
    return tmp / "runs" / "fx"


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{run_dir.parents[2]}/mlruns.db"  # <tmp>/runs/fx/<variant>
    return MlflowClient(tracking_uri=uri).get_run((run_dir / "mlflow_run_id").read_text().strip())


@pytest.mark.slow
def test_eval_scores_every_variant_and_logs_to_its_mlflow_run(run, tmp_path, capsys):
    from rayfp4.eval import main

    ckpt = run / "fp32" / "checkpoint_00000004"
    assert (ckpt / "shards" / ".metadata").is_file() and "model" not in torch.load(ckpt / "state.pt", weights_only=True)
    (tmp_path / "sonnet.txt").write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n")
    assert main([str(run), "--data", "val", "--data", str(tmp_path / "sonnet.txt"), "--max-sequences", "8"]) == 0
    captured = capsys.readouterr()
    assert "[eval] fp32: checkpoint_00000004 (step 4)" in captured.err
    lines = captured.out.strip().splitlines()
    assert lines[0].split() == ["dataset", "variant", "step", "precision", "tokens", "loss", "perplexity",
                                "bits/byte", "gap", "vs", "fp32"]
    rows = [l.split() for l in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [("val", "fp32"), ("val", "nvfp4")] * 2 + [("sonnet.txt", "fp32"), ("sonnet.txt", "nvfp4")] * 2
    assert rows[0][-1] == "(baseline)" and rows[3][3:5] == ["trained", "(nvfp4)"] and rows[3][-1].endswith("%")

    for variant, rel_tol in [("fp32", 1e-5), ("nvfp4", 2e-4)]:  # nvfp4: 2.4e-5 measured
        mlflow = mlflow_run(run / variant)
        # (Tracker.log_metrics has logged "/" as "." in some versions.)
        metrics = {k.replace(".", "/").replace("sonnet/txt", "sonnet.txt"): v for k, v in mlflow.data.metrics.items()}
        for data in ("val", "sonnet.txt"):
            for precision in ("bf16", "trained"):
                loss = metrics[f"eval/{data}/{precision}/loss"]
                assert math.isclose(metrics[f"eval/{data}/{precision}/perplexity"], math.exp(loss), rel_tol=1e-9)
                assert 0 < metrics[f"eval/{data}/{precision}/bits_per_byte"] < loss / math.log(2)  # > 1 byte a token
        assert "sonnet.txt" in mlflow.data.tags["rayfp4.eval.sonnet.txt"]
        assert "8 sequences" in mlflow.data.tags["rayfp4.eval.val"]
        # In its training precision, a checkpoint's loss on the validation sequences is the one its
        # training logged at that step: exactly (up to summation order) in FP32, and close in NVFP4,
        # whose tensor scales span a batch and training batched the sequences per worker.
        logged = read_metrics(run / variant / "metrics.jsonl")[4]["val_loss"]
        assert math.isclose(metrics["eval/val/trained/loss"], logged, rel_tol=rel_tol), (variant, logged)


@pytest.mark.slow
def test_generate_samples_from_the_run(run, capsys):
    # Seeds, top-k and the NVFP4 precision are tested on small models in tests/test_trained.py and
    # tests/test_generation.py; here the run's own tokenizer and checkpoint (sharded) in FP32.
    from rayfp4.generate import main

    assert main([str(run), "--prompt", "ROMEO:"]) == 2
    assert "the run has 2 variants (fp32, nvfp4); choose one with --variant" in capsys.readouterr().err
    assert main([str(run), "--variant", "fp32", "--prompt", "ROMEO:", "--max-tokens", "24", "--seed", "7"]) == 0
    captured = capsys.readouterr()
    assert "fp32 checkpoint_00000004 (step 4), trained (fp32): " in captured.err
    assert captured.out.startswith("ROMEO:") and len(captured.out) > len("ROMEO:\n")


@pytest.mark.slow
def test_export_of_the_sharded_variant_is_the_same_model_in_transformers(run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from rayfp4.export import main
    from rayfp4.model.generation import generate
    from rayfp4.train.trained import load_model, locate_one, run_shards

    assert main([str(run), "--variant", "fp32", "--out", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "model.safetensors", "rayfp4.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    variant, _ = locate_one(run / "fp32")
    ours = load_model(variant).model
    shards = run_shards(variant)
    tokens = torch.from_numpy(shards.read_split("val")[0][:4, :128].astype("int64"))
    with torch.no_grad():
        a, b = ours(tokens), hf(tokens).logits
    assert (a - b).abs().max().item() <= 1e-4 * a.abs().max().item()  # tolerance: tests/test_hf_export.py

    text = "KING HENRY: Once more unto the breach, dear friends, once more;"
    ids = shards.tokenizer().encode_batch([text])[0].tolist()
    assert tok(text)["input_ids"] == ids and tok.decode(ids) == text
    # Greedy decoding through our KV cache and through transformers' pick the same tokens.
    mine = generate(ours, ids, 12, temperature=0)
    theirs = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    assert mine[:len(theirs)] == theirs
