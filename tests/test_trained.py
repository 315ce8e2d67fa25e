"""Loading trained models back (rayfp4.train.trained) and the eval / generate / export CLIs on
variant folders written here, without Ray: whole and sharded checkpoints, verification and
fallback, and every kind of bad input (one line, exit 2). tests/test_eval_generate_export.py runs
the same CLIs on a real run of the default job."""

from __future__ import annotations

import json
import math
import sys
import warnings

import pytest
import torch
import yaml

from rayfp4.config import RunConfig
from rayfp4.data import open_shards
from rayfp4.model import build_model
from rayfp4.train.checkpoint import file_digests, save_state
from rayfp4.train.errors import CheckpointError
from rayfp4.train.trained import load_model, locate

MODEL = dict(vocab_size=272, seq_len=16, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, init_std=0.1)


def make_variant(folder, shards, steps=(3,), sharded=False, fmt="nvfp4", tie=True):
    """A variant folder as rayfp4.run leaves it (config.yaml, fingerprint.json, checkpoints) with
    random weights; returns {step: model state dict}."""
    cfg = RunConfig.model_validate({
        "name": "syn", "model": {**MODEL, "tie_embeddings": tie}, "data": {"shards": str(shards), "global_batch_size": 8, "seq_len": 16},
        "precision": {"format": fmt, **({"bf16_last_blocks": 1} if fmt != "bf16" else {})},
        "train": {"steps": max(steps), "dtype": "fp32"}, "scaling": {"num_workers": 1}})
    fp = cfg.fingerprint(open_shards(shards).manifest.identity())
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    (folder / "fingerprint.json").write_text(json.dumps({"fingerprint": fp}))
    weights = {}
    for step in steps:
        model = build_model(cfg.model)
        d = folder / f"checkpoint_{step:08d}"
        d.mkdir()
        if sharded:
            import torch.distributed.checkpoint as dcp

            with warnings.catch_warnings():  # "no process group: saving in a single process", indeed
                warnings.simplefilter("ignore", UserWarning)
                dcp.save({"model": model.state_dict()}, checkpoint_id=str(d / "shards"), no_dist=True)
            save_state(d, {"step": step}, fp, file_digests(d, "shards"))
        else:
            save_state(d, {"step": step, "model": model.state_dict()}, fp)
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return weights


def assert_weights(model, expected):
    got = model.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)


def one_error_line(capsys, *fragments):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in err, (f, err)
    return err


@pytest.mark.parametrize("sharded", [False, True])
def test_whole_and_sharded_checkpoints_load_the_saved_weights(small_shards, tmp_path, sharded):
    run = tmp_path / "runs" / "syn"
    weights = make_variant(run / "nvfp4", small_shards, steps=(2, 3), sharded=sharded)
    make_variant(run / "bf16", small_shards, fmt="bf16")
    found, ckpt = locate(run)
    assert [v.name for v in found] == ["bf16", "nvfp4"] and ckpt is None
    found, ckpt = locate(run, ["nvfp4"])
    trained = load_model(found[0])
    assert trained.step == 3 and trained.checkpoint.name == "checkpoint_00000003"
    assert_weights(trained.model, weights[3])
    found, ckpt = locate(run / "nvfp4" / "checkpoint_00000002")
    assert ckpt.name == "checkpoint_00000002"
    assert_weights(load_model(found[0], ckpt).model, weights[2])


def test_checkpoints_kept_in_checkpoint_storage_are_found(small_shards, tmp_path, capsys):
    from rayfp4.config import CheckpointSection

    if "storage" not in CheckpointSection.model_fields:
        pytest.skip("this version has no checkpoint.storage")
    variant = tmp_path / "runs" / "syn" / "nvfp4"
    weights = make_variant(variant, small_shards)
    cfg = yaml.safe_load((variant / "config.yaml").read_text())
    cfg["checkpoint"]["storage"] = str(tmp_path / "store")
    (variant / "config.yaml").write_text(yaml.safe_dump(cfg))
    stored = tmp_path / "store" / "syn" / "nvfp4"  # <storage>/<run>/<variant>, as Ray Train writes it
    stored.mkdir(parents=True)
    (variant / "checkpoint_00000003").rename(stored / "checkpoint_00000003")
    assert_weights(load_model(locate(variant)[0][0]).model, weights[3])
    cfg["checkpoint"]["storage"] = "s3://bucket/prefix"
    (variant / "config.yaml").write_text(yaml.safe_dump(cfg))
    from rayfp4.generate import main

    assert main([str(variant), "--prompt", "a"]) == 2
    one_error_line(capsys, "s3://bucket/prefix, which is not a local directory")


@pytest.mark.parametrize("sharded", [False, True])
def test_a_damaged_checkpoint_is_named_and_the_previous_one_used(small_shards, tmp_path, sharded, capsys):
    variant = tmp_path / "nvfp4"
    weights = make_variant(variant, small_shards, steps=(2, 3), sharded=sharded)
    newest = variant / "checkpoint_00000003"
    damaged = next((newest / "shards").glob("*.distcp")) if sharded else newest / "state.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    skipped = []
    trained = load_model(locate(variant)[0][0], warn=skipped.append)
    assert trained.step == 2 and "checkpoint_00000003 does not load" in skipped[0]
    assert_weights(trained.model, weights[2])
    with pytest.raises(CheckpointError, match=damaged.name):
        load_model(*[locate(newest)[0][0], newest])
    from rayfp4.generate import main

    assert main([str(newest), "--prompt", "fair is"]) == 2
    one_error_line(capsys, str(damaged), "does not match")


def test_a_checkpoint_of_another_model_is_refused(small_shards, tmp_path, capsys):
    variant = tmp_path / "nvfp4"
    make_variant(variant, small_shards)
    cfg = yaml.safe_load((variant / "config.yaml").read_text())
    cfg["model"]["d_ff"] = 192
    (variant / "config.yaml").write_text(yaml.safe_dump(cfg))
    from rayfp4.export import main

    assert main([str(variant), "--out", str(tmp_path / "hf")]) == 2
    one_error_line(capsys, "written for another model", "model.d_ff: 128 -> 192")


@pytest.mark.parametrize("cli", ["eval", "generate", "export"])
def test_paths_and_variants_that_do_not_exist(cli, small_shards, tmp_path, capsys):
    import importlib

    main = importlib.import_module(f"rayfp4.{cli}").main
    extra = {"eval": [], "generate": ["--prompt", "hi"], "export": ["--out", str(tmp_path / "hf")]}[cli]
    assert main([str(tmp_path / "missing"), *extra]) == 2
    one_error_line(capsys, "missing: does not exist")
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), *extra]) == 2
    one_error_line(capsys, "not a rayfp4 run, variant or checkpoint folder")
    make_variant(tmp_path / "run" / "nvfp4", small_shards)
    assert main([str(tmp_path / "run"), "--variant", "fp8", *extra]) == 2
    one_error_line(capsys, "no variant 'fp8' (there: nvfp4)")
    (tmp_path / "run" / "bare").mkdir()
    (tmp_path / "run" / "bare" / "config.yaml").write_text("model: {}\n")
    (tmp_path / "run" / "bare" / "fingerprint.json").write_text('{"fingerprint": {}}')
    assert main([str(tmp_path / "run" / "bare"), *extra]) == 2
    one_error_line(capsys, "no checkpoint_* folder")


def test_generate_and_eval_refuse_bad_settings(small_shards, tmp_path, capsys):
    from rayfp4.eval import main as eval_main
    from rayfp4.generate import main as generate_main

    variant = tmp_path / "nvfp4"
    make_variant(variant, small_shards)
    for args, message in [(["--prompt", ""], "--prompt is empty"), (["--prompt", "a", "--temperature", "-1"], "--temperature"),
                          (["--prompt", "a", "--top-k", "-2"], "--top-k"), (["--prompt", "a", "--max-tokens", "0"], "--max-tokens")]:
        assert generate_main([str(variant), *args]) == 2
        one_error_line(capsys, message)
    assert eval_main([str(variant), "--data", str(tmp_path / "nope.jsonl")]) == 2
    one_error_line(capsys, "nope.jsonl: no such file or shard directory")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    assert eval_main([str(variant), "--data", str(tmp_path / "bad.jsonl")]) == 2
    one_error_line(capsys, "bad.jsonl:2: expected a JSON string or an object with a string field 'text'")
    assert eval_main([str(variant), "--baseline", "fp32"]) == 2
    one_error_line(capsys, "--baseline fp32: not among the variants")


def test_eval_scores_text_as_the_model_computes_it(small_shards, tmp_path, capsys):
    """Loss and bits per byte of a file, checked against the model's own loss on the same rows."""
    from rayfp4.eval import _parser, evaluate

    variant = tmp_path / "fp32"
    make_variant(variant, small_shards, fmt="bf16")
    text = "Fair is foul, and foul is fair: hover through the fog and filthy air.\n"  # ASCII: 1 byte a token
    (tmp_path / "witches.txt").write_text(text)
    (tmp_path / "lines.jsonl").write_text(json.dumps({"text": text}) + "\n")
    args = _parser().parse_args([str(variant), "--data", str(tmp_path / "witches.txt"), "--data",
                                 str(tmp_path / "lines.jsonl"), "--precision", "trained", "--no-log", "--device", "cpu"])
    results, table = evaluate(args)
    assert [r.dataset for r in results] == ["witches.txt", "lines.jsonl"]
    r = results[0]
    assert r.loss == results[1].loss  # the same text, packed the same way
    ids = list(text.encode()) + [256]  # the byte tokenizer, then end-of-text; rows of 17
    rows = [ids[i:i + 17] for i in range(0, len(ids), 17)]
    rows = [row for row in rows if len(row) >= 2]
    model = load_model(locate(variant)[0][0]).model
    with torch.no_grad():
        nll = sum(model(torch.tensor([row[:-1]]), torch.tensor([row[1:]])).item() * (len(row) - 1) for row in rows)
    tokens = sum(len(row) - 1 for row in rows)
    assert r.tokens == tokens and math.isclose(r.loss, nll / tokens, rel_tol=1e-6)
    # Every id but each row's first is predicted: the text's bytes but those firsts, and EOT (0 bytes).
    assert r.bytes == len(text) - len(rows)
    assert math.isclose(r.bits_per_byte, nll / math.log(2) / r.bytes, rel_tol=1e-6)
    assert math.isclose(r.perplexity, math.exp(r.loss))
    assert "witches.txt  fp32" in table and "trained (fp32)" in table


def test_eval_on_other_shards_needs_the_runs_tokenizer(small_shards, tmp_path, capsys):
    from conftest import synthetic_documents, write_byte_shards
    from rayfp4.data.shards import ShardWriter
    from rayfp4.data.tokenizer import train_bpe
    from rayfp4.eval import _parser, evaluate, main

    variant = tmp_path / "fp32"
    make_variant(variant, small_shards, fmt="bf16")
    write_byte_shards(tmp_path / "longer", synthetic_documents(6, seed=5), seq_len=32, val_fraction=0.2)
    args = _parser().parse_args([str(variant), "--data", f"{tmp_path / 'longer'}:train", "--data", "val",
                                 "--precision", "trained", "--max-sequences", "5", "--no-log", "--device", "cpu"])
    results, _ = evaluate(args)
    assert [r.dataset for r in results] == ["longer.train", "val"]
    assert results[0].tokens == 5 * 16  # rows of 33 tokens cut to the run's 16 + 1
    assert results[1].tokens == min(5, open_shards(small_shards).num_sequences("val")) * 16
    capsys.readouterr()

    docs = synthetic_documents(8, seed=2)
    with ShardWriter(tmp_path / "bpe", seq_len=16, tokenizer=train_bpe(iter(docs), 270), val_fraction=0.2,
                     rows_per_group=8, shard_sequences=64) as writer:
        for ids in writer.tokenizer.encode_batch(docs):
            writer.add_document(ids)
        writer.finish()
    assert main([str(variant), "--data", str(tmp_path / "bpe")]) == 2
    one_error_line(capsys, "its tokenizer is not the run's")
    assert main([str(variant), "--data", f"{tmp_path / 'witches.txt'}:val"]) == 2
    one_error_line(capsys, "no such file or shard directory")


def test_generate_prints_the_prompt_and_a_repeatable_continuation(small_shards, tmp_path, capsys):
    from rayfp4.generate import main

    variant = tmp_path / "nvfp4"
    make_variant(variant, small_shards)
    outs = []
    for seed in (1, 1, 2):
        assert main([str(variant), "--prompt", "when shall we", "--max-tokens", "12", "--seed", str(seed),
                     "--temperature", "1.5", "--top-k", "0", "--device", "cpu"]) == 0
        captured = capsys.readouterr()
        assert "trained (nvfp4)" in captured.err and "tokens in" in captured.err
        outs.append(captured.out)
    assert outs[0] == outs[1] != outs[2] and outs[0].startswith("when shall we")


def test_export_needs_safetensors_and_says_which_extra(small_shards, tmp_path, monkeypatch, capsys):
    from rayfp4.export import main

    make_variant(tmp_path / "fp32", small_shards, fmt="bf16")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import fails as if not installed
    assert main([str(tmp_path / "fp32"), "--out", str(tmp_path / "hf")]) == 2
    one_error_line(capsys, "safetensors", "hf extra", "pip install -e '.[hf]'")
    assert not (tmp_path / "hf").exists()
    monkeypatch.delitem(sys.modules, "safetensors.torch")
    pytest.importorskip("safetensors")
    assert main([str(tmp_path / "fp32"), "--out", str(tmp_path / "hf"), "--nvfp4"]) == 2
    one_error_line(capsys, "--nvfp4: variant fp32 trained in bf16")
    assert main([str(tmp_path / "fp32"), "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "hf" / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "hf" / "rayfp4.json").read_text())["step"] == 3
    assert main([str(tmp_path / "fp32"), "--out", str(tmp_path / "hf")]) == 2
    one_error_line(capsys, "exists and is not an empty folder (--force replaces it)")
    assert main([str(tmp_path / "fp32"), "--out", str(tmp_path / "hf"), "--force"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


@pytest.mark.slow
def test_export_of_an_nvfp4_variant_loads_in_transformers(small_shards, tmp_path, capsys):
    """Untied embeddings and the byte tokenizer; nvfp4.safetensors holds the codes the forward uses."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from rayfp4.data.tokenizer import ByteTokenizer
    from rayfp4.export import main
    from rayfp4.formats import e2m1
    from rayfp4.model.hf_llama import rope_halves_order
    from rayfp4.train.trained import in_precision

    make_variant(tmp_path / "nvfp4", small_shards, tie=False)
    assert main([str(tmp_path / "nvfp4"), "--out", str(tmp_path / "hf"), "--nvfp4"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    trained = load_model(locate(tmp_path / "nvfp4")[0][0])
    tokens = torch.from_numpy(open_shards(small_shards).read_split("train")[0][:4, :16].astype("int64"))
    with torch.no_grad():
        ours, theirs = trained.model(tokens), hf(tokens).logits
    assert (ours - theirs).abs().max().item() <= 1e-4 * ours.abs().max().item()  # see tests/test_hf_export.py
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "ça va — fair is foul\n"
    assert tok(text)["input_ids"] == ByteTokenizer().encode_batch([text])[0].tolist()
    assert tok.eos_token == "<|endoftext|>" and tok.decode(tok(text)["input_ids"]) == text

    # The 4-bit weights: the codes, scales and amax the trained precision's forward quantized.
    q4 = load_file(tmp_path / "hf" / "nvfp4.safetensors")
    model, _ = in_precision(trained, "trained", backend="reference")
    layer = model.layers[0].attn.qkv
    layer.capture = {}
    with torch.no_grad():
        model(tokens[:1])
    wq = layer.capture["fprop.w"]
    hd, order = MODEL["d_model"] // MODEL["n_heads"], rope_halves_order(MODEL["d_model"] // MODEL["n_heads"])
    k_rows = slice(64, 96)
    k_packed = wq.data[k_rows].view(2, hd, -1)[:, order].reshape(32, -1)
    assert torch.equal(q4["model.layers.0.self_attn.k_proj.weight_packed"], k_packed)
    assert torch.equal(q4["model.layers.0.self_attn.v_proj.weight_packed"], wq.data[96:])
    assert torch.equal(q4["model.layers.0.self_attn.v_proj.weight_scale"].view(torch.uint8), wq.scale[96:].view(torch.uint8))
    assert q4["model.layers.0.self_attn.q_proj.weight_amax"].item() == wq.amax.item()
    # The documented decoding gives the dequantized weight, in the Llama layout.
    v = q4["model.layers.0.self_attn.v_proj.weight_packed"]
    values = (e2m1.decode(e2m1.unpack(v)) * q4["model.layers.0.self_attn.v_proj.weight_scale"].float().repeat_interleave(16, 1)
              ) * (q4["model.layers.0.self_attn.v_proj.weight_amax"] / 2688)
    assert torch.equal(values, wq.dequantize()[96:])
    w = load_file(tmp_path / "hf" / "model.safetensors")["model.layers.0.self_attn.v_proj.weight"]
    assert (values - w).abs().max() <= 0.5 * w.abs().max()  # the same weight, to 4-bit precision
    assert not any(k.startswith("model.layers.1.") for k in q4)  # the last block stayed BF16 (bf16_last_blocks)
