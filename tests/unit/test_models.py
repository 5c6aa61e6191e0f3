"""Checks every model family must pass (run on each entry of TINY_MODELS; the decoding
checks on each family that decodes, on each engine that runs it: DECODING_CASES)."""
from __future__ import annotations

import torch

from conftest import make_engine, make_model, random_batch, stepwise_logits, vocab_sizes
from transduce.checkpoint import load_model_tensors, read_checkpoint, save_checkpoint
from transduce.data.pipeline import Batch
from transduce.registry import build_model


def batch_for(name, b=4, seed=0):
    src_v, tgt_v = vocab_sizes(name)
    return random_batch(b, seed, src_v, tgt_v)


def single(batch: Batch, i: int) -> Batch:
    s = int(batch.src_mask[i].sum())
    t = int((batch.labels[i] != 0).sum())
    return Batch(batch.src[i: i + 1, :s], batch.src_mask[i: i + 1, :s], batch.tgt_in[i: i + 1, :t],
                 batch.labels[i: i + 1, :t])


def test_padding_does_not_change_real_positions(model_name):
    model = make_model(model_name)
    batch = batch_for(model_name, b=5)
    with torch.no_grad():
        full = model(batch)
        for i in range(5):
            alone = model(single(batch, i))
            t = alone.shape[1]
            torch.testing.assert_close(full[i, :t], alone[0], atol=1e-5, rtol=1e-4)


def test_incremental_decoding_equals_full_forward(decoding_case):
    name, engine = decoding_case
    model = make_engine(name, engine)
    batch = batch_for(name, b=4, seed=1)
    with torch.no_grad():
        full = model(batch)
        inc = stepwise_logits(model, batch)
    real = batch.labels != 0
    torch.testing.assert_close(inc[real], full[real], atol=1e-5, rtol=1e-4)


def test_beam_rows_share_memory_and_reorder(decoding_case):
    """Stepping beam rows (folded per source) and reordering them equals per-row decoding."""
    name, engine = decoding_case
    model = make_engine(name, engine)
    batch = batch_for(name, b=3, seed=2)
    k, steps = 2, 4
    g = torch.Generator().manual_seed(0)
    _, tgt_v = vocab_sizes(name)
    paths = torch.randint(4, tgt_v, (3 * k, steps), generator=g)
    with torch.no_grad():
        memory = model.encode(batch.src, batch.src_mask)
        state = model.init_state(memory, k, steps + 1)
        last = torch.full((3 * k,), 2)
        got = []
        perm = torch.tensor([1, 0, 2, 3, 5, 4])  # swap the beams of sources 0 and 2
        cur = torch.arange(3 * k)                 # which path each row follows
        for t in range(steps):
            logits, state = model.step(last, state)
            got.append(logits[torch.argsort(cur)])
            state = model.reorder_state(state, perm)
            cur = cur[perm]
            last = paths[cur, t]
        # Reference: each path alone, beam 1.
        for row in range(3 * k):
            src_i = row // k
            m1 = model.encode(batch.src[src_i: src_i + 1], batch.src_mask[src_i: src_i + 1])
            st = model.init_state(m1, 1, steps + 1)
            tok = torch.tensor([2])
            # the path a row followed: BOS, then paths[row] as assigned when reordered
            seq = [2]
            for t in range(steps):
                lg, st = model.step(torch.tensor([seq[-1]]), st)
                torch.testing.assert_close(lg[0], got[t][row], atol=1e-5, rtol=1e-4)
                seq.append(int(paths[row, t]))


def test_save_load_round_trip(model_name, tmp_path):
    model = make_model(model_name, seed=3)
    batch = batch_for(model_name, seed=3)
    save_checkpoint(tmp_path, "step-0000001", model, None, {"step": 1}, best=True, keep=1)
    _, tensors = read_checkpoint(tmp_path / "checkpoints" / "step-0000001")
    torch.manual_seed(99)
    fresh = make_model(model_name, seed=99)
    load_model_tensors(fresh, tensors, tmp_path)
    with torch.no_grad():
        assert not torch.equal(make_model(model_name, seed=99)(batch), model(batch))
        torch.testing.assert_close(fresh(batch), model(batch), atol=0, rtol=0)


def test_transformer_source_keys_are_contiguous_and_layout_free():
    """The decoder's source keys/values are stored contiguous per head (the per-step matmuls would copy
    strided ones at every step); the logits are those of the strided projections."""
    model = make_model("transformer-postnorm-learned")
    batch = batch_for("transformer-postnorm-learned", b=3, seed=4)
    with torch.no_grad():
        memory = model.encode(batch.src, batch.src_mask)
        state = model.init_state(memory, 1, 4)
        assert all(t.is_contiguous() for kv in state.mem_kv for t in kv)
        strided = model.init_state(memory, 1, 4)
        strided.mem_kv = [layer.cross_attn.project_kv(memory.states) for layer in model.decoder]
        assert not strided.mem_kv[0][0].is_contiguous()
        last = torch.full((3,), 2)
        for _ in range(3):
            a, state = model.step(last, state)
            b, strided = model.step(last, strided)
            torch.testing.assert_close(a, b)
            last = a.argmax(-1)
