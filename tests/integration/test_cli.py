"""A short end-to-end CLI run on a slice of cmudict: train, resume, translate, evaluate, info."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.cmudict.max_words=1500", "model.d_model=32", "model.ff_dim=64", "model.heads=2",
        "model.encoder_layers=1", "model.decoder_layers=1", "train.warmup_steps=10",
        "train.batch_tokens=800", "train.log_every=5", "train.eval_every=10", "train.eval_max_items=30",
        "train.max_minutes=0", "train.threads=1"]


def cli(*args, stdin: str | None = None, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "transduce", *args], input=stdin, capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"transduce {args} failed:\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    sets = [a for s in TINY + ["train.max_steps=20"] for a in ("--set", s)]
    p = cli("train", "recipes/g2p_cmudict.yaml", "--out", str(out), *sets)
    assert json.loads(p.stdout.strip().splitlines()[-1])["step"] == 20
    return out


def test_train_writes_run_dir(run_dir):
    for f in ("config.yaml", "source_codec.json", "target_codec.json", "metrics.jsonl", "checkpoints/index.json"):
        assert (run_dir / f).is_file(), f
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20]
    assert all({"loss", "lr", "tokens_per_s"} <= set(r) for r in steps)
    assert [r["step"] for r in records if "dev" in r] == [10, 20]
    assert set(records[-1]["dev"]) == {"wer", "per", "wer_nostress", "per_nostress"}


def test_resume_continues_from_last_checkpoint(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    sets = [a for s in TINY + ["train.max_steps=30"] for a in ("--set", s)]
    p = cli("train", "recipes/g2p_cmudict.yaml", "--out", str(copy), *sets)
    assert "resuming" in p.stderr and "from step 20" in p.stderr
    records = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30]
    # A changed model is refused, naming what differs.
    p = cli("train", "recipes/g2p_cmudict.yaml", "--out", str(copy),
            *[a for s in TINY + ["train.max_steps=30", "model.d_model=64"] for a in ("--set", s)], check=False)
    assert p.returncode == 2 and "model.d_model: 32 -> 64" in p.stderr


def test_translate_keeps_order_and_empty_lines(run_dir):
    p = cli("translate", "--model", str(run_dir), "--beam", "2", stdin="cat\n\nphoneme\ncat\n")
    lines = p.stdout.split("\n")
    assert len(lines) == 5 and lines[4] == "" and lines[1] == "" and lines[0] == lines[3]
    nb = cli("translate", "--model", str(run_dir), "--beam", "3", "--nbest", "3", stdin="cat\n")
    assert len(nb.stdout.strip("\n").split("\t")) == 3
    # several batches decoded two at a time: the same lines, in order
    words = "cat\n\nphoneme\ndog\nbird\nfish\ntranscription\nxylophone\n"
    one = cli("translate", "--model", str(run_dir), "--batch-size", "2", stdin=words)
    two = cli("translate", "--model", str(run_dir), "--batch-size", "2", "--workers", "2", stdin=words)
    assert two.stdout == one.stdout and len(one.stdout.split("\n")) == 9
    bad = cli("translate", "--model", str(run_dir), "--workers", "0", stdin="cat\n", check=False)
    assert bad.returncode != 0 and "--workers must be at least 1" in bad.stderr


def test_translate_and_evaluate_in_int8(run_dir, tmp_path):
    p = cli("translate", "--model", str(run_dir), "--quantize", "int8", stdin="cat\n\nphoneme\n")
    lines = p.stdout.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[0] and lines[2]
    test = tmp_path / "t.tsv"
    test.write_text("cat\tK AE1 T\ndog\tD AO1 G\n")
    p = cli("evaluate", "--model", str(run_dir), "--data", str(test), "--quantize", "int8")
    assert json.loads(p.stdout.strip().splitlines()[-1])["items"] == 2
    p = cli("translate", "--model", str(run_dir), "--engine", "ctranslate2", "--quantize", "int8",
            stdin="cat\n", check=False)
    assert p.returncode != 0 and "--quantize needs --engine torch" in p.stderr


def test_evaluate_prints_json_last(run_dir, tmp_path):
    test = tmp_path / "t.tsv"
    test.write_text("cat\tK AE1 T\ndog\tD AO1 G\ncat\tK AE2 T\n")
    p = cli("evaluate", "--model", str(run_dir), "--data", str(test), "--beam", "1")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["items"] == 2 and 0 <= result["wer"] <= 100 and "per" in result


def test_info(run_dir):
    info = json.loads(cli("info", str(run_dir)).stdout)
    assert info["family"] == "transformer" and info["d_model"] == 32 and info["parameters"] > 0
    assert info["source_vocab"] > 20 and info["target_vocab"] > 40 and info["training"]["step"] == 20


def test_help_lists_every_command():
    out = cli("--help").stdout
    for c in ("train", "translate", "evaluate", "info"):
        assert c in out
    assert "--nbest" in cli("translate", "--help").stdout


@pytest.mark.parametrize("remove", ["config.yaml", "target_codec.json", "checkpoints/index.json",
                                    "MODEL"])
def test_missing_run_files_are_named(run_dir, tmp_path, remove):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    if remove == "MODEL":
        index = json.loads((copy / "checkpoints" / "index.json").read_text())
        target = copy / "checkpoints" / index["best"] / "model.safetensors"
    else:
        target = copy / remove
    target.unlink()
    p = cli("translate", "--model", str(copy), stdin="cat\n", check=False)
    assert p.returncode == 2
    assert str(target) in p.stderr and "missing" in p.stderr, p.stderr


def test_bad_data_stops_before_training(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("cat\tK AE1 T\ndog D AO1 G\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{family: transformer, d_model: 32, heads: 2}}\ndata: {{train: {bad}}}\n")
    p = cli("train", str(cfg), "--out", str(tmp_path / "r"), check=False)
    assert p.returncode == 2 and f"{bad}:2: no tab" in p.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_attention_command_and_translate_attention(run_dir, tmp_path):
    png = tmp_path / "a.png"
    p = cli("attention", "--model", str(run_dir), "--input", "cat", "--output", str(png), "--head", "0")
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["shown"] == "layer 0, head 0" and png.read_bytes()[:4] == b"\x89PNG"
    jl = tmp_path / "a.jsonl"
    p = cli("translate", "--model", str(run_dir), "--attention", str(jl), stdin="cat\n\ndog\n")
    records = [json.loads(line) for line in jl.read_text().splitlines()]
    assert [r["source"] for r in records] == ["cat", "", "dog"]
    assert [r["output"] for r in records] == p.stdout.split("\n")[:3]
    assert len(records[0]["attention"][0][0][0]) == 3  # layer 0, head 0, step 0: over 3 source chars


def test_decoding_follows_the_runs_decode_quantize_unless_told(run_dir, tmp_path, monkeypatch):
    import argparse
    import shutil

    import yaml

    from transduce.cli import _decoding_run
    from transduce.models.quantize import Int8Linear

    def int8(model_dir, flag):
        run = _decoding_run(argparse.Namespace(model=[str(model_dir)], quantize=flag))
        return any(isinstance(m, Int8Linear) for m in run.model.modules())

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    for setting in (None, "int8"):
        cfg["decode"]["quantize"] = setting
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        assert int8(run, None) == (setting == "int8")
        assert int8(run, "int8") and not int8(run, "none")
    cfg["decode"]["quantize"] = "auto"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    from transduce import precision

    for flags, expect in ((frozenset({"avx2"}), False), (frozenset({"avx2", "avx512_vnni"}), True),
                          (frozenset({"avx_vnni"}), True), (frozenset({"amx_int8", "amx_tile"}), True)):
        monkeypatch.setattr(precision, "cpu_flags", lambda flags=flags: flags)
        assert int8(run, None) == expect, flags
        assert int8(run, "auto") == expect and int8(run, "int8") and not int8(run, "none")
    cfg["decode"]["quantize"] = "int4"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    p = cli("translate", "--model", str(run), stdin="cat\n", check=False)
    assert p.returncode != 0 and "int4" in p.stderr and "int8" in p.stderr  # the valid choice named
