"""train.bf16: true, false, or auto (bf16 autocast where the hardware multiplies bf16 natively)."""
from __future__ import annotations

import logging
import math

import pytest
import torch

from toyrun import losses, toy_config, toy_data
from transduce import precision
from transduce.training.trainer import train

CPU = torch.device("cpu")
AMX = frozenset({"fpu", "avx512f", "amx_bf16", "amx_tile", "amx_int8"})
AVX512_BF16 = frozenset({"fpu", "avx512f", "avx512_vnni", "avx512_bf16"})
NO_AMX = frozenset({"fpu", "avx512f", "avx512_vnni"})


@pytest.mark.parametrize("flags,expected,kind", [(AMX, True, "AMX"), (AVX512_BF16, True, "AVX512-BF16"),
                                                 (NO_AMX, False, None), (frozenset(), False, None)])
def test_auto_takes_bf16_only_where_the_cpu_multiplies_it_natively(monkeypatch, caplog, flags, expected, kind):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    with caplog.at_level(logging.INFO, logger="transduce"):
        assert precision.use_bf16("auto", CPU) is expected
    assert ("bf16 autocast" if expected else "fp32") in caplog.text
    if kind:
        assert f"({kind})" in caplog.text


def test_explicit_settings_are_kept_and_bf16_without_amx_is_warned_about(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_flags", lambda: NO_AMX)
    with caplog.at_level(logging.WARNING, logger="transduce"):
        assert precision.use_bf16(False, CPU) is False
        assert not caplog.records
        assert precision.use_bf16(True, CPU) is True
    assert "no native bf16" in caplog.text and "auto" in caplog.text
    monkeypatch.setattr(precision, "cpu_flags", lambda: AMX)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="transduce"):
        assert precision.use_bf16(True, CPU) is True
    assert not caplog.records


def test_cpu_flags_reads_this_machine():
    flags = precision.cpu_flags()
    assert isinstance(flags, frozenset)
    if flags:  # Linux: an x86 CPU lists fpu, an ARM one fp
        assert "fpu" in flags or "fp" in flags


def test_bf16_training_learns_and_repeats_itself(tmp_path):
    # bf16 autocast with fp32 master weights: the loss falls as in fp32, and a second run of the same
    # config repeats it bit for bit (what exact resume rests on)
    data = toy_data(tmp_path)
    runs = {}
    for name, bf16 in (("fp32", False), ("bf16", True), ("bf16-again", True)):
        train(toy_config(data, max_steps=30, bf16=bf16, save_every=0), tmp_path / name, progress=False)
        runs[name] = [loss for _, loss in losses(tmp_path / name)]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert runs["bf16-again"] == bf16
    assert bf16 != fp32                                    # the matmuls really ran in bf16
    assert all(math.isfinite(x) for x in bf16)
    assert sum(bf16[-5:]) < 0.9 * sum(bf16[:5])            # it learns
    assert abs(sum(bf16[-5:]) - sum(fp32[-5:])) < 0.1 * sum(fp32[-5:])  # as fp32 does
