"""The CPU kernels (transduce/kernels) against PyTorch: attention, norms, dropout, int8 linear layers."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transduce import kernels
from transduce.models.layers import Attention


def reference(q, k, v, mask, group, causal):
    """Plain PyTorch: q (N, H, Tq, dh), k/v (M, H, Tk, dh), N = M * group, mask (M, 1, 1, Tk)."""
    n, h, tq, dh = q.shape
    k = k.repeat_interleave(group, 0)
    v = v.repeat_interleave(group, 0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    tk = k.shape[2]
    if causal:
        scores = scores.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask.repeat_interleave(group, 0), float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)  # a query with no key left attends to nothing
    return probs @ v


def random_mask(m, tk, g):
    mask = torch.rand(m, 1, 1, tk, generator=g) > 0.3
    mask[..., 0] = True
    return mask


def test_kernel_builds_here():
    # g++ and ninja are part of the machine's set-up; a missing build would quietly slow decoding
    assert kernels.ops() is not None


@pytest.mark.parametrize("dh", [32, 48, 64, 24])
@pytest.mark.parametrize("group", [1, 5])
def test_one_query_per_row_matches(dh, group):
    g = torch.Generator().manual_seed(dh + group)
    m, h, tk = 7, 3, 11
    q = torch.randn(m * group, h, 1, dh, generator=g)
    k, v = torch.randn(2, m, h, tk, dh, generator=g)
    mask = random_mask(m, tk, g)
    out = kernels.attend(q, k, v, mask, group, False, dh ** -0.5)
    assert out.shape == q.shape
    torch.testing.assert_close(out, reference(q, k, v, mask, group, False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tk", [3, 17, 30, 40])
def test_shared_keys_of_every_length_match(tk):
    # the beams of a source read its keys laid out once: up to 32 keys in registers, more in memory
    g = torch.Generator().manual_seed(tk)
    m, h, dh, group = 3, 2, 32, 4
    q = torch.randn(m * group, h, 2, dh, generator=g)
    k, v = torch.randn(2, m, h, tk, dh, generator=g)
    mask = random_mask(m, tk, g)
    out = kernels.attend(q, k, v, mask, group, False, dh ** -0.5)
    torch.testing.assert_close(out, reference(q, k, v, mask, group, False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_many_queries_strided_inputs_match(causal):
    # q, k, v as the projections hand them over: strided views of one (B, T, 3 * D) tensor
    g = torch.Generator().manual_seed(1)
    b, t, h, dh = 4, 9, 4, 16
    qkv = torch.randn(b, t, 3 * h * dh, generator=g)
    q, k, v = (x.view(b, t, h, dh).transpose(1, 2) for x in qkv.chunk(3, -1))
    assert not q.is_contiguous()
    mask = None if causal else random_mask(b, t, g)
    out = kernels.attend(q, k, v, mask, 1, causal, dh ** -0.5)
    torch.testing.assert_close(out, reference(q, k, v, mask, 1, causal), rtol=1e-5, atol=1e-5)


def test_causal_with_fewer_queries_than_keys_sees_the_earlier_keys():
    # a cached prefix of 6 positions and 3 new ones: query i sees keys 0 .. 6 + i
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 3, 8, generator=g)
    k, v = torch.randn(2, 2, 2, 9, 8, generator=g)
    out = kernels.attend(q, k, v, None, 1, True, 8 ** -0.5)
    torch.testing.assert_close(out, reference(q, k, v, None, 1, True), rtol=1e-5, atol=1e-5)


def test_query_with_every_key_masked_gets_zeros():
    q = torch.randn(2, 2, 1, 8)
    k = torch.randn(2, 2, 4, 8)
    mask = torch.ones(2, 1, 1, 4, dtype=torch.bool)
    mask[1] = False
    out = kernels.attend(q, k, k, mask, 1, False, 0.5)
    assert torch.isfinite(out).all() and (out[1] == 0).all() and (out[0] != 0).any()


def test_declines_what_it_does_not_do():
    q = torch.randn(2, 2, 3, 8)
    k = torch.randn(2, 2, 3, 8)
    assert kernels.attend(q.requires_grad_(), k, k, None, 1, False, 1.0) is None     # autograd
    q = q.detach()
    assert kernels.attend(q.double(), k.double(), k.double(), None, 1, False, 1.0) is None
    per_query = torch.ones(2, 1, 3, 3, dtype=torch.bool)                             # not key padding
    assert kernels.attend(q, k, k, per_query, 1, False, 1.0) is None
    assert kernels.attend(q, k, k, None, 1, False, 1.0) is not None


@pytest.mark.parametrize("group", [1, 3])
def test_attention_module_same_with_and_without_kernel(monkeypatch, group):
    torch.manual_seed(0)
    attn = Attention(32, 4, 0.1, cross=True).eval()
    m, tk = 5, 7
    q = torch.randn(m * group, 4, 1, 8)
    k, v = torch.randn(2, m, 4, tk, 8)
    mask = random_mask(m, tk, torch.Generator().manual_seed(3))
    with torch.no_grad():
        fast = attn.attend(q, k, v, mask, group=group)
        with kernels.disabled():  # as on a machine where the build failed
            slow = attn.attend(q, k, v, mask, group=group)
            weights = []
            shown = attn.attend(q, k, v, mask, weights=weights, group=group)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shown, slow, rtol=1e-5, atol=1e-5)
    assert weights[0].shape == (m * group, 4, 1, tk)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(m * group, 4, 1))


def test_disabled_by_environment(monkeypatch):
    assert kernels.ops() is not None
    monkeypatch.setenv("TRANSDUCE_KERNELS", "0")
    assert kernels.ops() is None
    q = torch.randn(1, 1, 1, 4)
    assert kernels.attend(q, q, q, None, 1, False, 1.0) is None


def train_case(b, h, tq, tk, dh, causal, masked, seed):
    """A fused q, k, v projection (leaf tensors) and its split heads; causal: one sequence's own keys."""
    g = torch.Generator().manual_seed(seed)
    if causal:
        qkv = torch.randn(b, tq, 3 * h * dh, generator=g).requires_grad_()
        leaves = (qkv,)
        q, k, v = (x.view(b, tq, h, dh).transpose(1, 2) for x in qkv.chunk(3, -1))
    else:
        qx = torch.randn(b, tq, h * dh, generator=g).requires_grad_()
        kv = torch.randn(b, tk, 2 * h * dh, generator=g).requires_grad_()
        leaves = (qx, kv)
        q = qx.view(b, tq, h, dh).transpose(1, 2)
        k, v = (x.view(b, tk, h, dh).transpose(1, 2) for x in kv.chunk(2, -1))
    mask = random_mask(b, tk, g) if masked else None
    return leaves, q, k, v, mask


@pytest.mark.parametrize("tq,tk,dh,causal,masked", [
    (7, 7, 32, True, False),     # decoder self-attention
    (9, 13, 32, False, True),    # cross-attention, padded source
    (1, 5, 64, False, True),
    (12, 12, 24, False, True),   # dh the kernel has no special case for
    (10, 11, 48, False, True),   # d_model 192 with 4 heads
    (30, 30, 32, True, False),   # 32 keys: the last width held in registers
    (40, 40, 32, False, True),   # more keys than that: sums in memory (not used in training: slower)
])
def test_training_kernel_matches_pytorch_forward_and_gradients(tq, tk, dh, causal, masked):
    leaves, q, k, v, mask = train_case(3, 4, tq, tk, dh, causal, masked, seed=tq + tk + dh)
    out = kernels.attend_train(q, k, v, mask, causal, dh ** -0.5, max_keys=None)
    assert out.shape == q.shape and out.requires_grad
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * w).sum(), leaves)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tq,tk,dh,causal,masked", [
    (7, 7, 32, True, False),
    (10, 11, 48, False, True),   # a half block of 32 elements at the end of each dot product
    (12, 12, 24, False, True),   # dh without a special case
    (9, 16, 64, False, True),    # one block of 16 keys' dot products
    (20, 37, 64, False, True),   # three blocks, the last one partial
    (33, 33, 32, True, False),
])
def test_training_kernel_in_bf16_is_the_float32_kernel_rounded(tq, tk, dh, causal, masked):
    # bf16 in (bf16 autocast's projections): out and gradients in bf16, the arithmetic in float32,
    # so the float32 kernel's results on the same values, rounded once: exactly, or (where the scores
    # are bf16 dot products, dh 32, 48 or 64 on a CPU with AVX512-BF16, their sums in another order)
    # now and then the neighbouring bf16 value
    g = torch.Generator().manual_seed(tq + dh)
    mask = random_mask(3, tk, g) if masked else None
    # q, k, v as the heads of fused projections: (B, T, H * dh) viewed split, innermost contiguous
    half = [torch.randn(3, t, 4 * dh, generator=g).bfloat16().view(3, t, 4, dh).transpose(1, 2).requires_grad_()
            for t in (tq, tk, tk)]
    full = [t.detach().float().requires_grad_() for t in half]
    out_b = kernels.attend_train(*half, mask, causal, dh ** -0.5, max_keys=None)
    out_f = kernels.attend_train(*full, mask, causal, dh ** -0.5, max_keys=None)
    assert out_b.dtype == torch.bfloat16 and out_f.dtype == torch.float32
    w = torch.randn(out_f.shape, generator=g).bfloat16()
    grads_b = torch.autograd.grad((out_b * w).sum(), half)
    grads_f = torch.autograd.grad((out_f * w.float()).sum(), full)
    for a, b in zip([out_b, *grads_b], [out_f, *grads_f]):
        assert a.dtype == torch.bfloat16 and a.abs().sum() > 0
        if dh not in (32, 48, 64):
            assert torch.equal(a, b.bfloat16())
        else:
            assert (a == b.bfloat16()).float().mean() > 0.97
            torch.testing.assert_close(a.float(), b, rtol=2 ** -7, atol=1e-5)


@pytest.mark.parametrize("dh", [8, 32])  # 32: the weighted sums of whole vectors, several rows at once
def test_training_kernel_query_without_keys_gets_zeros_and_no_gradient(dh):
    leaves, q, k, v, _ = train_case(2, 2, 3, 4, dh, False, False, seed=5)
    mask = torch.ones(2, 1, 1, 4, dtype=torch.bool)
    mask[1] = False  # the second row has no key to attend to
    out = kernels.attend_train(q, k, v, mask, False, 0.3)
    assert out[1].abs().sum() == 0 and out[0].abs().sum() > 0
    dq, dkv = torch.autograd.grad(out.square().sum() + out.sum(), leaves)
    assert dq[1].abs().sum() == 0 and dkv[1].abs().sum() == 0
    assert dq[0].abs().sum() > 0 and dkv[0].abs().sum() > 0


def test_training_kernel_declines_what_it_does_not_do():
    q = torch.randn(2, 2, 3, 8, requires_grad=True)
    assert kernels.attend_train(q.double(), q.double(), q.double(), None, False, 1.0) is None
    shared = torch.ones(1, 1, 3, 3, dtype=torch.bool)  # one mask broadcast over the rows
    assert kernels.attend_train(q, q, q, shared, False, 1.0) is None
    assert kernels.attend_train(q, q, q, None, False, 1.0) is not None
    long = torch.randn(2, 2, kernels.TRAIN_MAX_KEYS + 1, 8, requires_grad=True)  # flash is faster there
    assert kernels.attend_train(long, long, long, None, False, 1.0) is None
    assert kernels.attend_train(long, long, long, None, False, 1.0, max_keys=None) is not None


def test_training_kernel_takes_a_mask_per_query():
    # the single-stack families' masks: a prefix LM's source sees itself both ways, its target causally
    from transduce.models.lm import attention_mask

    src_mask = torch.tensor([[True, True, True], [True, True, False]])
    mask = attention_mask(src_mask, 4, bidirectional_source=True)[:, None]  # (B, 1, 7, 7)
    leaves, q, k, v, _ = train_case(2, 3, 7, 7, 32, True, False, seed=11)
    out = kernels.attend_train(q, k, v, mask, False, 32 ** -0.5)
    assert out is not None
    ref = reference(q, k, v, mask, 1, False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * w).sum(), leaves)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), leaves)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cross", [False, True])
def test_attention_module_trains_on_the_kernel_as_on_pytorch(monkeypatch, cross):
    # gradients needed and no dropout: the training kernel; the same outputs and gradients as
    # PyTorch's attention (a machine whose build failed)
    torch.manual_seed(0)
    attn = Attention(32, 4, 0.0, cross=cross).train()
    x = torch.randn(3, 6, 32, requires_grad=True)
    mem = torch.randn(3, 5, 32, requires_grad=True)
    mask = random_mask(3, 5, torch.Generator().manual_seed(1))

    def run():
        if cross:
            k, v = attn.project_kv(mem)
            o = attn.attend(attn.split(attn.q(x)), k, v, mask)
        else:
            o = attn.attend(*attn.project_qkv(x), causal=True)
        out = attn.out(attn.merge(o))
        grads = torch.autograd.grad(out.square().sum(), [x, mem, *attn.parameters()], allow_unused=True)
        return out, grads

    calls = []
    real = kernels.attend_train
    monkeypatch.setattr(kernels, "attend_train", lambda *a: calls.append(1) or real(*a))
    fast, fast_grads = run()
    assert calls, "the training kernel was not used"
    with kernels.disabled():
        slow, slow_grads = run()
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
        for a, b in zip(fast_grads, slow_grads):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_attention_dropout_keeps_pytorch_path():
    attn = Attention(16, 2, 0.5, cross=False).train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    q, k, v = attn.project_qkv(x)
    torch.manual_seed(0)
    a = attn.attend(q, k, v, causal=True)
    torch.manual_seed(1)
    b = attn.attend(q, k, v, causal=True)
    assert not torch.allclose(a, b)  # dropout drew different masks: not the (deterministic) kernel
    ref = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), is_causal=True)
    assert a.shape == ref.shape


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dh", [16, 48])  # any dh, and one with a case of its own
def test_self_step_writes_the_cache_and_attends_the_positions_so_far(indirect, dtype, dh):
    g = torch.Generator().manual_seed(4)
    n, h, tmax, t = 6, 4, 9, 5
    d = h * dh
    # through a table, the cache may have more rows than hypotheses (sources dropped from a search)
    cache_rows = n + 3 if indirect else n
    ck, cv = torch.randn(2, cache_rows, h, tmax, dh, generator=g).to(dtype)  # bfloat16: int8 copies' caches
    before_k, before_v = ck.clone(), cv.clone()
    fused = torch.randn(n, 4 * d, generator=g)
    qkv = fused[:, d:]                     # strided rows, as a slice of a wider projection
    # beam search's table: position j < t of hypothesis r lies in cache row rows[r, j]
    rows = torch.randint(0, cache_rows, (n, tmax), generator=g) if indirect else torch.empty(0, dtype=torch.long)
    bias = torch.randn(3 * d, generator=g)
    out = kernels.ops().self_step(qkv, bias, ck, cv, t, dh ** -0.5, rows)
    q, k, v = (x.view(n, 1, h, dh).transpose(1, 2) for x in (qkv + bias).split(d, 1))
    # written as PyTorch casts (bfloat16: rounded to nearest, ties to even)
    torch.testing.assert_close(ck[:n, :, t:t + 1], k.to(dtype), rtol=1e-6, atol=0)
    torch.testing.assert_close(cv[:n, :, t:t + 1], v.to(dtype), rtol=1e-6, atol=0)
    # only position t of the hypotheses' own rows changed
    assert torch.equal(ck[n:], before_k[n:]) and torch.equal(cv[n:], before_v[n:])
    keep = torch.ones(tmax, dtype=torch.bool)
    keep[t] = False
    assert torch.equal(ck[:, :, keep], before_k[:, :, keep]) and torch.equal(cv[:, :, keep], before_v[:, :, keep])
    written = ck.clone(), cv.clone()
    ck, cv = ck.float(), cv.float()  # the reference attends to what the cache holds
    if indirect:
        assert torch.equal(rows[:, t], torch.arange(n))  # the new position is each row's own
        cols = torch.arange(t + 1)
        keys = ck[rows[:, : t + 1], :, cols].transpose(1, 2)
        values = cv[rows[:, : t + 1], :, cols].transpose(1, 2)
        assert not torch.equal(keys, ck[:n, :, : t + 1])
        with pytest.raises(RuntimeError, match="must be as many"):  # no table: one row per hypothesis
            kernels.ops().self_step(qkv, bias, *written, t, 1.0, torch.empty(0, dtype=torch.long))
    else:
        keys, values = ck[:, :, : t + 1], cv[:, :, : t + 1]
    want = reference(q, keys, values, None, 1, False)
    torch.testing.assert_close(out, want.transpose(1, 2).reshape(n, d), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.ops().self_step(qkv, bias, *written, tmax, 1.0, rows)
    with pytest.raises(RuntimeError, match="must both be float32 or both bfloat16"):
        kernels.ops().self_step(qkv, bias, written[0], written[1].double(), t, 1.0, rows)
    without = kernels.ops().self_step(qkv + bias, torch.empty(0), *written, t, dh ** -0.5, rows)
    torch.testing.assert_close(without, out)


@pytest.mark.parametrize("group", [1, 3])
def test_attend_step_takes_queries_as_rows(group):
    g = torch.Generator().manual_seed(5)
    m, h, dh, tk = 4, 2, 8, 6
    q2 = torch.randn(m * group, 3 * h * dh, generator=g)[:, h * dh: 2 * h * dh]  # strided rows
    k, v = torch.randn(2, m, h, tk, dh, generator=g)
    mask = random_mask(m, tk, g)
    out = kernels.ops().attend_step(q2, k, v, mask[:, 0, 0], group, dh ** -0.5)
    q = q2.reshape(m * group, 1, h, dh).transpose(1, 2)
    want = reference(q, k, v, mask, group, False).transpose(1, 2).reshape(m * group, h * dh)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep_sum", [False, True])
@pytest.mark.parametrize("y_bias", [False, True])
def test_add_norm_is_layer_norm_of_the_sum(keep_sum, y_bias):
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(2, 37, 48, generator=g) * 3 + 1
    w, b, yb = torch.randn(3, 48, generator=g)
    total_want = x + y + yb if y_bias else x + y
    out, total = kernels.ops().add_norm(x, y, yb if y_bias else torch.empty(0), w, b, 1e-5, keep_sum)
    torch.testing.assert_close(out, F.layer_norm(total_want, (48,), w, b, 1e-5), rtol=1e-5, atol=1e-5)
    if keep_sum:
        torch.testing.assert_close(total, total_want)
    else:
        assert total is None
    with pytest.raises(RuntimeError, match="same"):
        kernels.ops().add_norm(x, y[:5], torch.empty(0), w, b, 1e-5, False)
    with pytest.raises(RuntimeError, match="y_bias"):
        kernels.ops().add_norm(x, y, yb[:5], w, b, 1e-5, False)


INT8_TOL = dict(rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["transformer-prenorm", "transformer-postnorm-learned", "transformer-bert-style"])
@pytest.mark.parametrize("beam", [1, 3])
@pytest.mark.parametrize("int8", [False, True])
def test_kernel_engine_steps_as_the_modules_do(name, beam, int8):
    from conftest import make_model

    from transduce.engine.kernels import KernelState, KernelTransformer
    from transduce.models.quantize import quantize

    model = quantize(make_model(name)) if int8 else make_model(name)
    fast = KernelTransformer(model, cache_dtype=torch.float32)  # bfloat16 caches: the test below
    torch.manual_seed(1)
    src = torch.randint(3, 13, (5, 7))
    src[1, 4:] = 0
    src[3, 2:] = 0
    tokens = torch.randint(3, 11, (8, 5 * beam))
    order = torch.randperm(5 * beam)
    after = torch.randperm(3 * beam)  # beam selection among the sources left

    def run(m):
        """Steps as search takes them: beams reordered, two sources dropped, beams reordered again."""
        logits = []
        n = 5 * beam
        with torch.no_grad():
            state = m.init_state(m.encode(src, src != 0), beam, 10)
            for i, tok in enumerate(tokens):
                if i == 4:
                    keep = torch.tensor([0, 2, 4])
                    state = m.reorder_state(state, (keep[:, None] * beam + torch.arange(beam)).view(-1), keep)
                    n = 3 * beam
                logits.append(m.step(tok[:n], state)[0])
                state = m.reorder_state(state, order if i < 4 else after)
                if m is fast:  # the cache stays and a table of rows follows the hypotheses
                    assert isinstance(state, KernelState) and state.rows.shape[0] == n
        return torch.cat(logits)

    tol = INT8_TOL if int8 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run(fast), run(model), **tol)


def test_int8_engine_caches_in_bfloat16_close_to_float():
    from conftest import make_model

    from transduce import engine as engines
    from transduce.engine.kernels import KernelTransformer
    from transduce.models.quantize import quantize
    from transduce.search import beam_search

    q = quantize(make_model("transformer-postnorm-learned", seed=7))
    torch.manual_seed(3)
    src = torch.randint(3, 13, (24, 7))
    src[5, 3:] = 0

    def decode(m):
        with torch.no_grad():
            caches = m.init_state(m.encode(src, src != 0), 1, 4).cache
            return caches[0][0].dtype, [h[0].tokens for h in beam_search(m, src, src != 0, beam=3, max_len_a=1.0,
                                                                          max_len_b=4)]

    (half, got), (full, want) = decode(engines.build(q, "kernels")), decode(KernelTransformer(q, torch.float32))
    assert half == torch.bfloat16 and full == torch.float32
    assert sum(a == b for a, b in zip(got, want)) >= 20, (got, want)  # near-ties may flip, as int8's do


@pytest.mark.parametrize("name", ["transformer-prenorm", "transformer-postnorm-learned", "transformer-bert-style",
                                  "encoder-mlm", "encoder-classifier-first-postnorm"])
@pytest.mark.parametrize("int8", [False, True])
def test_encoder_on_the_kernel_engine_as_on_the_modules(monkeypatch, name, int8):
    from conftest import make_model

    import transduce.engine.kernels as K
    from transduce import engine as engines
    from transduce.models.quantize import quantize

    model = quantize(make_model(name)) if int8 else make_model(name)
    fast = engines.build(model, "kernels")
    torch.manual_seed(2)
    src = torch.randint(3, 11, (4, 9))
    src[1, 5:] = 0
    src[2, 1:] = 0
    calls = []
    real = K.encode
    monkeypatch.setattr(K, "encode", lambda *a: calls.append(1) or real(*a))
    graded = fast.encode(src, src != 0).states  # with gradients: the modules' path
    assert not calls and graded.requires_grad
    with torch.no_grad():
        got = fast.encode(src, src != 0).states
        assert len(calls) == 1
        want = model.encode(src, src != 0).states
    torch.testing.assert_close(got, want, **(INT8_TOL if int8 else dict(rtol=1e-4, atol=1e-4)))
    torch.testing.assert_close(graded.detach(), want)
    if not model.can_decode:  # a head on the kernels' encoder
        with torch.no_grad():
            torch.testing.assert_close(fast.scores(src, src != 0), model.scores(src, src != 0),
                                       **(INT8_TOL if int8 else dict(rtol=1e-4, atol=1e-4)))


def test_engine_choice():
    from conftest import make_model

    from transduce import engine as engines
    from transduce.engine.kernels import KernelTransformer

    model = make_model("transformer-prenorm")
    assert engines.build(model, "torch") is model
    assert isinstance(engines.build(model, "auto"), KernelTransformer)
    assert engines.build(model, "kernels").describe() == model.describe()  # the model's own attributes
    rnn = make_model("lstm-bahdanau")
    assert engines.build(rnn, "auto") is rnn
    with pytest.raises(ValueError, match="engine 'kernels': it runs Transformer stacks, not a RNNSeq2Seq"):
        engines.build(rnn, "kernels")
    with pytest.raises(ValueError, match="unknown engine 'fast'; valid choices: auto, kernels, torch"):
        engines.build(model, "fast")


def test_engine_without_the_kernels_is_torch_or_a_clear_error(monkeypatch):
    from conftest import make_model

    from transduce import engine as engines

    with kernels.disabled():  # as on a machine where the build failed
        model = make_model("transformer-prenorm")
        assert engines.build(model, "auto") is model
        with pytest.raises(ValueError, match="engine 'kernels': the CPU kernels are not built here"):
            engines.build(model, "kernels")


def int8_weights(n, k, g):
    from torch import nn

    from transduce.models.quantize import Int8Linear

    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.1)
        lin.bias.copy_(torch.randn(n, generator=g))
    return lin, Int8Linear(lin)


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_kernel_is_the_pytorch_arithmetic(monkeypatch, bias):
    # quantize rows, multiply in int8, scale back: the kernel and models/quantize.py's PyTorch ops
    g = torch.Generator().manual_seed(3)
    lin, q = int8_weights(24, 40, g)
    x = torch.randn(300, 40, generator=g)  # more rows than a block (128)
    x[4] = 0  # a zero row quantizes to zeros (its scale is 0), not NaN
    b = q.bias if bias else torch.empty(0)
    fast = kernels.ops().int8_linear(x, q.qweight, q.scale, b)
    with kernels.disabled():
        slow = q(x) if bias else q.unbiased(x)[0]
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
        assert torch.equal(fast[4], b if bias else torch.zeros(24))
        ref = x @ lin.weight.detach().T + (lin.bias.detach() if bias else 0)
        err = (fast - ref).abs().max() / ref.abs().max()
        assert 0 < err < 0.02  # int8, so not exact, but within a few quanta


FFN_ACTS = {"relu": 1, "gelu": 2, "geglu": 3, "swiglu": 4}  # the feed-forward kernels' activation codes


def ffn_activation(act: str):
    from torch import nn
    from transduce.models.layers import GATED_ACTIVATIONS, GatedActivation

    return GatedActivation(GATED_ACTIVATIONS[act]) if act in GATED_ACTIVATIONS else nn.ReLU() if act == "relu" \
        else nn.GELU()


@pytest.mark.parametrize("act", list(FFN_ACTS))
def test_int8_ffn_is_up_activation_down(act):
    g = torch.Generator().manual_seed(4)
    gated = act in ("geglu", "swiglu")  # up projects to the gate's 48 columns, then the linear half's
    _, up = int8_weights(96 if gated else 48, 16, g)
    _, down = int8_weights(16, 48, g)
    x = torch.randn(300, 16, generator=g)  # rows in blocks of 128, the last one short
    fast = kernels.ops().int8_ffn(x, up.qweight, up.scale, up.bias, FFN_ACTS[act], down.qweight, down.scale)
    hidden = ffn_activation(act)(up(x))
    slow = down.unbiased(hidden)[0]  # layer by layer, the hidden layer stored as float32
    # the kernel's erf differs from PyTorch's in float32's last bits, which may move a hidden value
    # across an int8 rounding boundary: one quantum of a row's hidden layer through down's weights
    quantum = hidden.abs().amax(1, keepdim=True) / 127 * (down.qweight.float() * down.scale[:, None]).abs().max()
    diff = (fast - slow).abs()
    assert (diff <= 1.01 * quantum + 1e-5).all()
    assert (diff > 1e-4).float().mean() < 0.005  # and rarely
    with pytest.raises(RuntimeError, match="act must be"):
        kernels.ops().int8_ffn(x, up.qweight, up.scale, up.bias, 5, down.qweight, down.scale)
    with pytest.raises(RuntimeError, match="weight must be int8"):
        kernels.ops().int8_ffn(x, down.qweight, down.scale, down.bias, 1, up.qweight, up.scale)


# The AMX path (`int8_pack`'s 3-D weights): the checks take the ops that run it, the CPU's own where
# it has AMX int8 tiles, and everywhere with AVX-512 the same source built on tiles in software
# (`emulated_tiles`); the reference is always this CPU's _int_mm path.
LINEAR_SHAPES = [(1, 40, 24), (17, 192, 73), (33, 64, 32), (300, 100, 576)]


def check_pack_layout(o):
    g = torch.Generator().manual_seed(5)
    w = torch.randint(-127, 128, (40, 70), dtype=torch.int8, generator=g)
    p = o.int8_pack(w)
    assert p.shape == (64 // 16, 128 // 4, 64)  # columns rounded up to 32, depth to 64
    # column block c, depth d: W[16c + j, d] at [c, d // 4, 4j + d % 4]; zero where padded
    c, j, d = torch.meshgrid(torch.arange(4), torch.arange(16), torch.arange(128), indexing="ij")
    n = 16 * c + j
    want = torch.zeros(64, 128, dtype=torch.int8)
    want[:40, :70] = w
    assert torch.equal(p[c, d // 4, 4 * j + d % 4], want[n, d])


def check_linear_on_tiles(o, m, k, n):
    # the same quantization, exact int32 sums, the same scaling: equal results; rows and columns
    # past a block's edge, depth not a multiple of 64
    g = torch.Generator().manual_seed(m)
    _, q = int8_weights(n, k, g)
    x = torch.randn(m, k, generator=g)
    x[0] = 0
    packed = o.int8_pack(q.qweight)
    for b in (q.bias, torch.empty(0)):
        assert torch.equal(o.int8_linear(x, packed, q.scale, b), kernels.ops().int8_linear(x, q.qweight, q.scale, b))
    with pytest.raises(RuntimeError, match="packed weight must be"):
        o.int8_linear(torch.randn(m, k + 64), packed, q.scale, q.bias)


def check_ffn_on_tiles(o, act):
    g = torch.Generator().manual_seed(FFN_ACTS[act])
    gated = act in ("geglu", "swiglu")  # up: the gate's 100 columns, then the linear half's
    _, up = int8_weights(200 if gated else 100, 48, g)
    _, down = int8_weights(48, 100, g)
    x = torch.randn(70, 48, generator=g)  # blocks of 32 rows, the last one short
    fast = o.int8_ffn(x, o.int8_pack(up.qweight), up.scale, up.bias, FFN_ACTS[act], o.int8_pack(down.qweight),
                      down.scale)
    slow = kernels.ops().int8_ffn(x, up.qweight, up.scale, up.bias, FFN_ACTS[act], down.qweight, down.scale)
    # the hidden layer scaled back with fused multiply-adds (and the vector GELU): a float32 ulp
    # here and there, which may move a hidden value across an int8 rounding boundary: one quantum
    # of a row's hidden layer through down's weights, and rarely
    hidden = ffn_activation(act)(up(x))
    quantum = hidden.abs().amax(1, keepdim=True) / 127 * (down.qweight.float() * down.scale[:, None]).abs().max()
    diff = (fast - slow).abs()
    assert (diff <= 1.01 * quantum + 1e-4).all()
    assert (diff > 1e-4).float().mean() < 0.01
    if gated:  # an odd number of up columns has no halves
        _, odd = int8_weights(99, 48, g)
        with pytest.raises(RuntimeError, match="even number"):
            o.int8_ffn(x, o.int8_pack(odd.qweight), odd.scale, odd.bias, FFN_ACTS[act], o.int8_pack(down.qweight),
                       down.scale)


def check_gelu_is_exact(o, pack: bool):
    # erf by a rational function (Abramowitz and Stegun 7.1.28): GELU's erf form to float32's precision
    x = torch.linspace(-8, 8, 4001)[:, None]
    eye = (torch.eye(1) * 127).to(torch.int8)
    w = o.int8_pack(eye) if pack else eye  # the AMX path's vector GELU, or the _int_mm path's
    one = torch.full((1,), 1 / 127.0)
    # up = identity with the row's own scale (x one value per row), GELU, down = identity
    got = o.int8_ffn(x, w, one, torch.empty(0), 2, w, one)
    # each row's single value quantizes to +-127 exactly, so the result is GELU(x) quantized alike
    assert torch.allclose(got, nn.GELU()(x), rtol=1e-5, atol=2e-6)


def test_int8_pack_is_the_tiles_layout_or_refused_without_them():
    if not kernels.ops().int8_tiles():  # a CPU without AMX int8: the ops keep the (N, K) weight
        assert not kernels.int8_tiles()
        with pytest.raises(RuntimeError, match="AMX"):  # built without them, or the OS refused them
            kernels.ops().int8_pack(torch.zeros(40, 70, dtype=torch.int8))
        return
    check_pack_layout(kernels.ops())


needs_tiles = pytest.mark.skipif(not kernels.int8_tiles(),
                                 reason="the CPU has no AMX int8 tiles (test_tiles_path_on_emulated_tiles runs the path)")


@needs_tiles
@pytest.mark.parametrize("m,k,n", LINEAR_SHAPES)
def test_int8_linear_on_tiles_is_the_same_arithmetic(m, k, n):
    check_linear_on_tiles(kernels.ops(), m, k, n)
    _, q = int8_weights(n, k, torch.Generator().manual_seed(0))
    assert q.packed[0].dim() == 3  # Int8Linear packs where the tiles are used


@needs_tiles
@pytest.mark.parametrize("act", list(FFN_ACTS))
def test_int8_ffn_on_tiles_is_the_same_arithmetic(act):
    check_ffn_on_tiles(kernels.ops(), act)


def avx512() -> bool:
    from transduce.precision import cpu_flags

    flags = cpu_flags()
    return {"avx512f", "avx512bw", "avx512vl"} <= flags


LINEAR_OPS = ("int8_linear", "int8_ffn", "ffn", "int8_tiles", "int8_pack")  # linear.cpp's


@pytest.fixture(scope="module")
def emulated_tiles(tmp_path_factory):
    """linear.cpp built once more with tests/kernels/amx_emulation.h: the AMX path's code (packing, blocks,
    quantization, gated units) on tiles in software, on any CPU with AVX-512; its ops."""
    if not avx512():
        pytest.skip("the AMX path's own vector code needs AVX-512 (F, BW, VL)")
    from pathlib import Path

    from torch.utils.cpp_extension import load

    ns = "transduce_amx_emulated"
    shim = Path(__file__).with_name("amx_emulation.h")
    load(ns, [str(Path(kernels.__file__).with_name("linear.cpp"))],
         extra_cflags=["-O2", "-march=native", "-mamx-tile", "-mamx-int8", "-fopenmp", "-ffast-math",
                       "-include", str(shim), f"-Dtransduce={ns}"],
         extra_ldflags=kernels.LDFLAGS, build_directory=str(tmp_path_factory.mktemp("amx")), is_python_module=False)
    o = getattr(torch.ops, ns)
    assert o.int8_tiles()
    return o


def test_tiles_path_on_emulated_tiles(emulated_tiles):
    check_pack_layout(emulated_tiles)
    for shape in LINEAR_SHAPES:
        check_linear_on_tiles(emulated_tiles, *shape)
    for act in FFN_ACTS:
        check_ffn_on_tiles(emulated_tiles, act)
    check_gelu_is_exact(emulated_tiles, pack=True)


class MixedOps:
    """The kernels with linear.cpp's ops taken from another build (the emulated tiles')."""

    def __init__(self, linear, rest):
        self.linear, self.rest, self.called = linear, rest, set()

    def __getattr__(self, name):
        self.called.add(name)
        return getattr(self.linear if name in LINEAR_OPS else self.rest, name)


@pytest.mark.parametrize("name", ["transformer-postnorm-geglu", "transformer-swiglu", "transformer-prenorm"])
def test_int8_model_decodes_on_emulated_tiles_as_on_int_mm(monkeypatch, emulated_tiles, name):
    # engine/kernels.py and models/quantize.py with packed (3-D) weights, gated blocks included:
    # the encoder and the decoding step as the same model's on the _int_mm path
    from conftest import make_model

    from transduce.models.quantize import quantize

    src = torch.randint(3, 13, (5, 7), generator=torch.Generator().manual_seed(1))
    src[1, 4:] = 0

    def decode():
        from transduce.engine.kernels import KernelTransformer

        model = KernelTransformer(quantize(make_model(name)), cache_dtype=torch.float32)
        with torch.no_grad():
            memory = model.encode(src, src != 0)
            state = model.init_state(memory, 1, 6)
            logits = [model.step(tok, state)[0] for tok in torch.randint(3, 11, (4, 5),
                                                                         generator=torch.Generator().manual_seed(2))]
        packed = {m.packed[0].dim() for m in model.modules() if hasattr(m, "packed")}
        return memory.states, torch.cat(logits), packed

    with kernels.override(tiles=False):  # where the CPU has AMX too
        want_states, want, flat = decode()
    mixed = MixedOps(emulated_tiles, kernels.ops())
    with kernels.override(ops=mixed, tiles=True):
        states, got, packed = decode()
    assert flat == {2} and packed == {3}
    assert "int8_ffn" in mixed.called  # feed-forward blocks fused on the packed weights, gated ones too
    torch.testing.assert_close(states, want_states, **INT8_TOL)
    torch.testing.assert_close(got, want, **INT8_TOL)


@pytest.mark.parametrize("act", list(FFN_ACTS))
@pytest.mark.parametrize("rows", [1, 128, 300])
def test_float_ffn_is_up_activation_down(act, rows):
    from transduce.models.layers import FeedForward

    torch.manual_seed(rows)
    ff = FeedForward(16, 48, 0.0, act)  # parameters that require gradients, as a model's do
    x = torch.randn(rows, 16)
    with torch.no_grad():
        fast = kernels.ops().ffn(x, ff.up.weight, ff.up.bias, FFN_ACTS[act], ff.down.weight)
        slow = ff(x) - ff.down.bias
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    if act in ("geglu", "swiglu"):  # the up projection's rows are the gate's and the linear half's: 2 x 48
        with pytest.raises(RuntimeError, match="weights must be float32"):
            kernels.ops().ffn(x, ff.up.weight, ff.up.bias, FFN_ACTS[act], ff.up.weight)


def test_gelu_of_the_ffn_kernel_is_exact_gelu():
    check_gelu_is_exact(kernels.ops(), pack=False)
    if kernels.ops().int8_tiles():
        check_gelu_is_exact(kernels.ops(), pack=True)


def test_training_kernel_under_bf16_autocast_takes_and_gives_bf16():
    # under autocast the projections hand over bf16: the kernel computes in float32 (flash in bf16
    # was 4x its time) and hands bf16 back, so neither side casts; gradients flow back as bf16
    leaves, q, k, v, mask = train_case(3, 4, 9, 9, 32, False, True, seed=3)
    q16, k16, v16 = (x.bfloat16() for x in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kernels.attend_train(q16, k16, v16, mask, False, 32 ** -0.5)
    assert out is not None and out.dtype == torch.bfloat16
    ref = F.scaled_dot_product_attention(q16.float(), k16.float(), v16.float(), attn_mask=mask)
    torch.testing.assert_close(out, ref.bfloat16())
    (grad,) = torch.autograd.grad(out.float().sum(), leaves[:1])
    (ref_grad,) = torch.autograd.grad(ref.sum(), leaves[:1])
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0
    torch.testing.assert_close(grad, ref_grad, rtol=2e-2, atol=2e-2)  # through bf16 gradients
    # mixed dtypes run in float32
    mixed = kernels.attend_train(q16, k, v, mask, False, 32 ** -0.5)
    assert mixed is not None and mixed.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_kernel_drops_p_scales_the_rest_and_backward_uses_the_same_mask(dtype):
    from transduce.models.layers import Dropout

    drop = Dropout(0.1).train()  # 26/256 of the elements
    torch.manual_seed(0)
    x = (torch.rand(1000, 1003) + 0.5).to(dtype).requires_grad_()  # no zeros; an odd size
    out = drop(x)
    assert out.dtype == dtype and out.shape == x.shape
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - 26 / 256)) < 0.002
    torch.testing.assert_close(out[kept], (x[kept].float() * 256 / 230).to(dtype))
    w = torch.randn(x.shape).to(dtype)
    (grad,) = torch.autograd.grad((out * w).sum(), [x])
    assert torch.equal(grad != 0, kept & (w != 0))  # the forward's mask, recomputed
    torch.testing.assert_close(grad[kept], (w[kept].float() * 256 / 230).to(dtype))
    # the generator decides the mask: the same state draws it again, the next draw differs
    torch.manual_seed(0)
    torch.rand(1000, 1003)
    again = drop(x.detach())
    assert torch.equal(again, out.detach()) and not torch.equal(drop(x.detach()), again)
    # masks do not repeat along the tensor (the seed is hashed with each 8-element block's index)
    rows = (out != 0).view(-1)[: 1000 * 1000].view(1000, 1000)
    assert not torch.equal(rows[0], rows[1])


def test_dropout_kernel_masks_do_not_depend_on_threads():
    x = torch.ones(300, 700)
    outs = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(3)
            outs.append(kernels.dropout(x, 26))
        finally:
            torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_dropout_without_kernels_or_on_other_dtypes_keeps_the_byte_mask(monkeypatch):
    from transduce.models.layers import Dropout

    drop = Dropout(0.5).train()
    assert kernels.dropout(torch.ones(10, dtype=torch.float64), 128) is None
    out = drop(torch.ones(64, 64, dtype=torch.float64))
    assert out.dtype == torch.float64 and set(out.unique().tolist()) == {0.0, 2.0}
    with kernels.disabled():
        out = drop(torch.ones(64, 64))
        assert set(out.unique().tolist()) == {0.0, 2.0} and 0.4 < (out == 0).float().mean() < 0.6
        assert torch.equal(drop.eval()(torch.ones(3)), torch.ones(3))


def norm_train_case(n, d, ydtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).requires_grad_()
    y = torch.randn(n, d, generator=g).to(ydtype).requires_grad_()
    norm = nn.LayerNorm(d)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(d, generator=g))
        norm.bias.copy_(0.5 * torch.randn(d, generator=g))
    return x, y, norm


@pytest.mark.parametrize("n,d", [(37, 50), (40, 192)])
@pytest.mark.parametrize("ydtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", [0, 26])
@pytest.mark.parametrize("half", [False, True])
def test_add_norm_train_is_dropout_add_and_layer_norm(n, d, ydtype, threshold, half):
    # LayerNorm(x + dropout(y)) in one pass each way, against the dropout kernel (the same mask for
    # the same seed), PyTorch's add and layer_norm, and autocast's cast for the bf16 copy
    x, y, norm = norm_train_case(n, d, ydtype)
    seed, scale = 1234567, 256.0 / (256 - threshold)
    g = torch.Generator().manual_seed(9)
    w32, w16 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    params = [x, y, norm.weight, norm.bias]

    out, out16 = kernels._AddNormTrain.apply(x, y, norm.weight, norm.bias, norm.eps, seed, threshold, scale, half)
    loss = (out * w32).sum() + ((out16.float() * w16).sum() if half else 0)
    grads = torch.autograd.grad(loss, params)

    dropped = kernels._Dropout.apply(y, seed, threshold, scale) if threshold else y
    ref = F.layer_norm(x + dropped, (d,), norm.weight, norm.bias, norm.eps)
    ref16 = ref.bfloat16()
    ref_loss = (ref * w32).sum() + ((ref16.float() * w16).sum() if half else 0)
    ref_grads = torch.autograd.grad(ref_loss, params)

    assert out.dtype == torch.float32 and out.shape == (n, d)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if half:
        assert out16.dtype == torch.bfloat16
        torch.testing.assert_close(out16, ref16, rtol=8e-3, atol=1e-5)  # the same value, rounded
        assert (out16 == ref16).float().mean() > 0.99
    else:
        assert out16.numel() == 0
    for a, b, name in zip(grads, ref_grads, ("x", "y", "weight", "bias")):
        assert a.dtype == b.dtype, name
        tol = dict(rtol=2e-2, atol=2e-2) if a.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a, b, **tol, msg=name)
    if threshold:  # the dropped elements of y get no gradient
        assert torch.equal(grads[1] == 0, dropped == 0)


def test_add_norm_train_gradients_do_not_depend_on_threads():
    x, y, norm = norm_train_case(300, 64, torch.bfloat16)
    results = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out, out16 = kernels._AddNormTrain.apply(x, y, norm.weight, norm.bias, 1e-5, 5, 26, 256 / 230, True)
            results.append(torch.autograd.grad(out.sum() + out16.float().square().sum(),
                                               [x, y, norm.weight, norm.bias]))
        finally:
            torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_add_norm_train_declines_what_it_does_not_do():
    norm = nn.LayerNorm(8)
    x = torch.randn(3, 8)
    assert kernels.add_norm_train(x.double(), x.double(), norm, 0) is None
    assert kernels.add_norm_train(x, x[:, :4], norm, 0) is None
    assert kernels.add_norm_train(x.bfloat16(), x, norm, 0) is None  # the residual stream stays float32
    assert kernels.add_norm_train(x, x, nn.LayerNorm(8, elementwise_affine=False), 0) is None
    with pytest.raises(RuntimeError, match="threshold"):
        kernels.ops().add_norm_train(x, x, norm.weight, norm.bias, 1e-5, 0, 256, 1.0, False)


def test_post_norm_residuals_hand_the_next_projection_bf16_under_autocast(monkeypatch):
    # two post-norm Residuals around linear sublayers: under bf16 autocast the second one's
    # projection takes the first one's bf16 copy (no cast), and training matches PyTorch's path
    from transduce.models.layers import Residual, bf16_twin

    torch.manual_seed(0)
    r1, r2 = Residual(48, 0.0, False).train(), Residual(48, 0.0, False).train()
    f1, f2 = nn.Linear(48, 48), nn.Linear(48, 48)
    seen = []

    def sub2(h):
        seen.append(h.dtype)
        return f2(h)

    x = torch.randn(4, 7, 48, requires_grad=True)
    params = [x, *r1.parameters(), *r2.parameters(), *f1.parameters(), *f2.parameters()]

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = r1(x, f1)
            out = r2(h, sub2)
        return out, torch.autograd.grad(out.float().square().sum(), params)

    fast, fast_grads = run()
    assert seen == [torch.bfloat16] and fast.dtype == torch.float32
    assert bf16_twin(fast) is fast  # outside autocast: x itself
    monkeypatch.setattr(kernels, "add_norm_train", lambda *a: None)
    slow, slow_grads = run()
    assert seen[1] == torch.float32  # autocast casts it inside the projection
    torch.testing.assert_close(fast, slow, rtol=1e-2, atol=1e-2)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


def step_with_and_without(monkeypatch, model, name, bf16):
    """A training step's (loss, gradients) with kernels.<name> as it is, then with it returning None
    (PyTorch's path), the dropout kernel's masks drawn from the same generator state both times;
    and how many calls the first step made."""
    from conftest import random_batch

    batch = random_batch(6, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(), ignore_index=0)
        return loss, torch.autograd.grad(loss, params)

    calls = []
    real = getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = step()
    n = len(calls)
    with torch.no_grad():
        model(batch)
    assert len(calls) == n, "called without gradients"
    monkeypatch.setattr(kernels, name, lambda *a, **k: None)
    slow = step()
    tol = dict(rtol=3e-2, atol=3e-2) if bf16 else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip([fast[0], *fast[1]], [slow[0], *slow[1]]):
        torch.testing.assert_close(a, b, **tol)
    return n


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bf16", [False, True])
def test_post_norm_transformer_trains_on_the_norm_kernel_as_on_pytorch(monkeypatch, dropout, bf16):
    # a training step of a post-norm Transformer: the same loss and gradients with the norm kernel
    # as with PyTorch's add and layer_norm (the dropout kernel's masks are the same for the same
    # generator state: the seeds are drawn in the same order)
    from conftest import make_model

    from transduce.models.layers import Dropout

    model = make_model("transformer-postnorm-learned").train()
    for m in model.modules():
        if isinstance(m, Dropout):
            m.p, m.threshold = dropout, round(dropout * 256)
    assert step_with_and_without(monkeypatch, model, "add_norm_train", bf16) == 2 * 2 + 2 * 3  # every residual


def test_gelu_training_kernel_is_gelu_and_its_gradient():
    # float32: GELU's erf form and its derivative to within a few float32 steps (erf by A&S 7.1.26,
    # absolute error 1.5e-7), against x Phi(x) in float64 by erfc (no cancellation in the tail)
    x = torch.cat([torch.linspace(-12, 12, 20001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, -30.0, 30.0])])
    x64 = x.double().requires_grad_()
    ref = 0.5 * x64 * torch.special.erfc(-x64 / 2 ** 0.5)
    (ref_grad,) = torch.autograd.grad(ref, x64, torch.ones_like(ref))
    leaf = x.clone().requires_grad_()
    y = kernels.gelu(leaf)
    assert y is not None and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref.detach(), rtol=0, atol=5e-7)
    assert torch.equal(y[x >= 9], x[x >= 9]) and (y[x <= -9].abs() < 2e-18).all()  # Phi rounds to 1; ~0
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(y, leaf, w)
    torch.testing.assert_close(grad.double(), ref_grad * w.double(), rtol=0, atol=5e-7 * w.abs().max().item())


def bf16_nearest(v: torch.Tensor) -> torch.Tensor:
    """float64 -> bf16 rounded once to nearest even (a cast through float32 can round twice)."""
    first = v.bfloat16()
    bits = first.view(torch.int16).long() & 0xFFFF
    best, best_err = first, (first.double() - v).abs()
    for step in (-1, 1):
        other = ((bits + step) & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.bfloat16)
        err = (other.double() - v).abs()
        even = ((bits + step) & 1) == 0
        take = (err < best_err) | ((err == best_err) & even & ~other.isnan())
        best, best_err = torch.where(take, other, best), torch.where(take, err, best_err)
    return best


def test_gelu_training_kernel_in_bf16_is_the_exact_gelu_rounded_once():
    # bf16 in, bf16 out, by a table over every bf16 value: GELU and its derivative in float64,
    # rounded once, for all 65,536 inputs; infinities give their limits, NaN stays NaN
    x = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = x.isfinite()
    leaf = x.clone().requires_grad_()
    h = leaf * 1
    y = kernels.bias_act(h, None, "gelu", overwrite=True)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    v = x[finite].double()
    cdf = 0.5 * torch.special.erfc(-v / 2 ** 0.5)
    assert torch.equal(y[finite], bf16_nearest(v * cdf))
    derivative = h[finite]  # the forward pass left GELU'(x) in h
    assert torch.equal(derivative, bf16_nearest(cdf + v * torch.exp(-v * v / 2) / (2 * torch.pi) ** 0.5))
    inf = torch.tensor([float("inf"), -float("inf")]).bfloat16()
    assert torch.equal(kernels.gelu(inf.requires_grad_()), torch.tensor([float("inf"), 0.0]).bfloat16())
    assert y[x.isnan()].isnan().all()


def test_gelu_training_kernel_in_bf16_is_pytorchs_bf16_gelu():
    # PyTorch's bf16 GELU (float32 inside, rounded once) on 99.9%+ of inputs above x = -3 (the rest
    # within a bf16 step: PyTorch's float32 rounding), closer to the exact values below, where
    # PyTorch's 1 + erf(x / sqrt 2) cancels; the gradient rounded twice (the stored derivative, then
    # the product)
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(777, 129, generator=g)).bfloat16()
    leaf = x.clone().requires_grad_()
    y = kernels.gelu(leaf)
    ref_leaf = x.clone().requires_grad_()
    ref = F.gelu(ref_leaf)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert (y[x > -3] == ref[x > -3]).float().mean() > 0.999
    torch.testing.assert_close(y[x > -3], ref[x > -3], rtol=2 ** -8, atol=0)
    x64 = x.double()
    exact = (0.5 * x64 * torch.special.erfc(-x64 / 2 ** 0.5)).bfloat16()
    assert (y == exact).float().mean() > (ref == exact).float().mean() + 0.02
    w = torch.randn(x.shape, generator=g).bfloat16()
    (grad,) = torch.autograd.grad(y, leaf, w)
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, w)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1.6e-2, atol=1e-5)


@pytest.mark.parametrize("cols", [1024, 37])  # whole vectors; a remainder
def test_bias_gelu_kernel_in_bf16_rounds_the_sum_then_looks_it_up(cols):
    # bf16 with a float32 bias: v = x + b rounded to bf16 (as an addmm's output would be), then
    # GELU and its derivative of v exactly, rounded once
    g = torch.Generator().manual_seed(6)
    x = (3 * torch.randn(41, cols, generator=g)).bfloat16()
    bias = torch.randn(cols, generator=g)
    h = x.clone().requires_grad_() * 1
    y = kernels.bias_act(h, bias, "gelu", overwrite=True)
    v = (x.float() + bias).bfloat16().double()
    cdf = 0.5 * torch.special.erfc(-v / 2 ** 0.5)
    assert torch.equal(y, bf16_nearest(v * cdf))
    assert torch.equal(h.detach(), bf16_nearest(cdf + v * torch.exp(-v * v / 2) / (2 * torch.pi) ** 0.5))


def test_gelu_training_kernel_declines_what_it_does_not_do(monkeypatch):
    assert kernels.gelu(torch.ones(4, dtype=torch.float64)) is None
    with kernels.disabled():
        assert kernels.gelu(torch.ones(4)) is None


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("bf16", [False, True])
def test_feed_forward_trains_on_the_bias_activation_kernel_as_on_pytorch(monkeypatch, act, bf16):
    # a training step of a Transformer: the same loss and gradients (the up-projections' biases
    # among them, summed by the kernel) with the bias + activation kernel as with PyTorch's addmm and
    # activation; without gradients (decoding, evaluation) the kernel is not called
    from conftest import SRC_V, TGT_V, tiny_transformer

    from transduce.registry import build_model

    torch.manual_seed(0)
    model = build_model(tiny_transformer(activation=act, norm="post"), SRC_V, TGT_V).train()
    for m in model.modules():  # non-zero biases, so that a bias left out would show
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.normal_(m.bias, 0.0, 0.5)
    assert step_with_and_without(monkeypatch, model, "bias_act", bf16) == 4  # every feed-forward block


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("cols", [1024, 37])  # whole vectors; a remainder
def test_bias_activation_kernel_and_its_gradients(act, cols):
    # float32: act(x + b) and the gradients of x and b against float64, the derivative written over
    # x's memory when asked
    g = torch.Generator().manual_seed(2)
    x64, b64 = 3 * torch.randn(5, 41, cols, generator=g, dtype=torch.float64), torch.randn(cols, generator=g, dtype=torch.float64)
    w = torch.randn(5, 41, cols, generator=g, dtype=torch.float64)
    leaf, bias = x64.float().requires_grad_(), b64.float().requires_grad_()
    h = leaf * 1  # a fresh tensor that nothing else reads, as a projection's output
    y = kernels.bias_act(h, bias, act, overwrite=True)
    assert y is not None and y.dtype == torch.float32
    ref_x, ref_b = x64.float().double().requires_grad_(), b64.float().double().requires_grad_()
    ref = (F.gelu if act == "gelu" else F.relu)(ref_x + ref_b)
    torch.testing.assert_close(y.double(), ref.detach(), rtol=0, atol=5e-7 * 5)
    derivative = h.clone()  # the forward pass left act'(x + b) in h
    gx, gb = torch.autograd.grad(y, (leaf, bias), w.float())
    rx, rb = torch.autograd.grad(ref, (ref_x, ref_b), w)
    torch.testing.assert_close(gx.double(), rx, rtol=0, atol=2e-6 * w.abs().max().item())
    torch.testing.assert_close(gb.double(), rb, rtol=1e-5, atol=1e-4)
    v = x64.float().double() + b64.float().double()
    if act == "relu":
        assert torch.equal(derivative, (v > 0).float())
    else:  # Phi(v) + v phi(v)
        exact = 0.5 * torch.special.erfc(-v / 2 ** 0.5) + v * torch.exp(-v * v / 2) / (2 * torch.pi) ** 0.5
        torch.testing.assert_close(derivative.double(), exact, rtol=0, atol=1e-6)


def test_bias_activation_kernel_sums_the_bias_gradient_in_the_same_order_on_any_thread_count():
    x = torch.randn(700, 96, generator=torch.Generator().manual_seed(4)).bfloat16()
    w = torch.randn(700, 96, generator=torch.Generator().manual_seed(5)).bfloat16()
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            bias = torch.zeros(96, requires_grad=True)
            y = kernels.bias_act(x.clone().requires_grad_(), bias, "gelu")
            grads.append(torch.autograd.grad(y, bias, w)[0])
    finally:
        torch.set_num_threads(threads)
    assert grads[0].dtype == torch.float32
    assert all(torch.equal(grads[0], other) for other in grads[1:])


def test_bias_activation_kernel_refuses_a_second_backward_pass():
    leaf = torch.randn(8, 16, requires_grad=True)
    y = kernels.bias_act(leaf * 1, torch.zeros(16, requires_grad=True), "relu", overwrite=True)
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        y.sum().backward()
    with pytest.raises(ValueError, match="unknown activation 'swish'; choose from"):
        kernels.bias_act(leaf, None, "swish")


def exact_act(gate: str, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU or SiLU and its derivative in float64."""
    if gate == "gelu":
        cdf = 0.5 * torch.special.erfc(-v / 2 ** 0.5)
        return v * cdf, cdf + v * torch.exp(-v * v / 2) / (2 * torch.pi) ** 0.5
    sigma = torch.sigmoid(v)
    return v * sigma, sigma * (1 + v * (1 - sigma))


@pytest.mark.parametrize("gate", ["gelu", "silu"])
@pytest.mark.parametrize("cols", [64, 37])  # whole vectors; a remainder
def test_gated_kernel_and_its_gradients(gate, cols):
    # float32: act(g + b1) * (l + b2) for x = [g | l], and the gradients of x and b against float64
    g = torch.Generator().manual_seed(7)
    x64, b64 = 3 * torch.randn(5, 9, 2 * cols, generator=g, dtype=torch.float64), torch.randn(2 * cols, generator=g, dtype=torch.float64)
    w = torch.randn(5, 9, cols, generator=g, dtype=torch.float64)
    leaf, bias = x64.float().requires_grad_(), b64.float().requires_grad_()
    y = kernels.bias_act(leaf * 1, bias, gate, overwrite=True, glu=True)
    assert y is not None and y.dtype == torch.float32 and y.shape == (5, 9, cols)
    ref_x, ref_b = x64.float().double().requires_grad_(), b64.float().double().requires_grad_()
    gate_in, lin = (ref_x + ref_b).chunk(2, dim=-1)
    ref = (F.gelu if gate == "gelu" else F.silu)(gate_in) * lin
    torch.testing.assert_close(y.double(), ref.detach(), rtol=1e-6, atol=1e-5)
    gx, gb = torch.autograd.grad(y, (leaf, bias), w.float())
    rx, rb = torch.autograd.grad(ref, (ref_x, ref_b), w)
    assert gx.shape == leaf.shape and gb.shape == bias.shape
    torch.testing.assert_close(gx.double(), rx, rtol=1e-5, atol=2e-5 * w.abs().max().item())
    torch.testing.assert_close(gb.double(), rb, rtol=1e-5, atol=1e-4)


def equal_but_subnormals(y: torch.Tensor, ref: torch.Tensor) -> bool:
    """y == ref, but where ref is subnormal y may be zero: a product the kernel rounds to bf16 by
    AVX512-BF16's conversion, which flushes subnormals (values below 1.2e-38)."""
    sub = (ref != 0) & (ref.float().abs() < torch.finfo(torch.float32).tiny)
    return torch.equal(y[~sub], ref[~sub]) and bool(((y[sub] == ref[sub]) | (y[sub] == 0)).all())


@pytest.mark.parametrize("gate", ["gelu", "silu"])
def test_gated_kernel_in_bf16_is_the_exact_activation_rounded_once(gate):
    # every bf16 gate value with a linear half of ones: act(g) and act'(g) exact in float64, rounded
    # once, for all 65,536 inputs (the products by the ones may flush subnormals); infinities give
    # their limits, NaN stays NaN
    x = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = x.isfinite()
    h = torch.cat([x, torch.ones_like(x)]).requires_grad_() * 1
    y = kernels.bias_act(h, None, gate, overwrite=True, glu=True)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    value, slope = exact_act(gate, x[finite].double())
    assert equal_but_subnormals(y[finite], bf16_nearest(value))
    d_gate, d_lin = h.detach().chunk(2)  # the forward pass left [act'(g) * l | act(g)] in h
    assert equal_but_subnormals(d_gate[finite], bf16_nearest(slope))
    assert torch.equal(d_lin[finite], bf16_nearest(value))
    assert torch.equal(y[~finite & ~x.isnan()], torch.tensor([0.0, float("inf")]).bfloat16())  # -inf, inf
    assert y[x.isnan()].isnan().all()


@pytest.mark.parametrize("gate", ["gelu", "silu"])
@pytest.mark.parametrize("cols", [96, 37])  # whole vectors; a remainder
def test_gated_kernel_in_bf16_rounds_as_pytorch_would(gate, cols):
    # bf16 with a float32 bias: each half plus its bias rounded to bf16 (an addmm's output), the
    # activation's exact value rounded to bf16 (its output), times the linear half rounded again (a
    # bf16 product); the gradients the stored halves times the incoming gradient, each rounded once,
    # the bias's gradient their sums
    g = torch.Generator().manual_seed(8)
    x = (3 * torch.randn(41, 2 * cols, generator=g)).bfloat16()
    bias = torch.randn(2 * cols, generator=g)
    h = x.clone().requires_grad_() * 1
    b = bias.clone().requires_grad_()
    y = kernels.bias_act(h, b, gate, overwrite=True, glu=True)
    v = (x.float() + bias).bfloat16()
    gate_in, lin = v.double().chunk(2, dim=-1)
    value, slope = exact_act(gate, gate_in)
    a = bf16_nearest(value)
    assert torch.equal(y, (a.float() * lin.float()).bfloat16())
    stored = h.detach().clone()
    assert torch.equal(stored, torch.cat([(bf16_nearest(slope).float() * lin.float()).bfloat16(), a], dim=-1))
    w = torch.randn(41, cols, generator=g).bfloat16()
    gx, gb = torch.autograd.grad(y, (h, b), w)
    products = stored.float() * torch.cat([w, w], dim=-1).float()
    assert torch.equal(gx, products.bfloat16())
    torch.testing.assert_close(gb, products.sum(0), rtol=1e-5, atol=1e-4)  # of the products before rounding
    # PyTorch's own bf16 GLU: within a bf16 step or two
    ref_x = v.clone().requires_grad_()
    rg, rl = ref_x.chunk(2, dim=-1)
    ref = (F.gelu if gate == "gelu" else F.silu)(rg) * rl
    torch.testing.assert_close(y.float(), ref.float(), rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("act", ["geglu", "swiglu"])
@pytest.mark.parametrize("bf16", [False, True])
def test_gated_feed_forward_trains_on_the_kernel_as_on_pytorch(monkeypatch, act, bf16):
    # a training step of a Transformer with gated feed-forward blocks: the same loss and gradients
    # with the kernel as with PyTorch's GELU / SiLU times the linear half
    from conftest import SRC_V, TGT_V, tiny_transformer

    from transduce.registry import build_model

    torch.manual_seed(0)
    model = build_model(tiny_transformer(activation=act, norm="post"), SRC_V, TGT_V).train()
    ff = model.encoder[0].ff
    assert ff.up.out_features == 2 * ff.down.in_features == 2 * 64
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            torch.nn.init.normal_(m.bias, 0.0, 0.5)
    assert step_with_and_without(monkeypatch, model, "bias_act", bf16) == 4


def test_gated_kernel_declines_what_it_does_not_do():
    with pytest.raises(ValueError, match="unknown gated activation 'relu'; choose from"):
        kernels.bias_act(torch.randn(4, 8), None, "relu", glu=True)
    with pytest.raises(ValueError, match="unknown activation 'silu'"):
        kernels.bias_act(torch.randn(4, 8), None, "silu")
    with pytest.raises(RuntimeError, match="last dimension must be even"):
        kernels.bias_act(torch.randn(4, 7, requires_grad=True), None, "gelu", glu=True)


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projection_gradient_comes_whole_from_the_kernel(monkeypatch, cross, dtype):
    # the split heads of one fused projection (q, k, v; or a cross-attention's k, v): the kernel's
    # backward writes their gradients side by side, and the split hands that buffer on without
    # concatenating; the same gradients as the split by chunk (whose backward concatenates). A
    # projection whose heads are used twice gets summed gradients and takes the concatenation.
    from transduce.models.layers import split_heads

    torch.manual_seed(0)
    attn = Attention(32, 4, 0.0, cross=cross).train()
    x = torch.randn(3, 6, 32).to(dtype).requires_grad_()
    mem = torch.randn(3, 5, 32).to(dtype).requires_grad_()
    attn.to(dtype)

    def run(split, twice=False):
        if cross:
            proj = attn.kv(mem)
            k, v = split(proj, 2)
            q = attn.split(attn.q(x))
        else:
            proj = attn.qkv(x)
            q, k, v = split(proj, 3)
        o = attn.attend(q, k, v)
        if twice:
            o = o + attn.attend(q, k, v)
        (grad,) = torch.autograd.grad(o.float().square().sum(), [proj])
        return grad

    def chunked(p, n):
        b, t, _ = p.shape
        return tuple(c.view(b, t, 4, -1).transpose(1, 2) for c in p.chunk(n, dim=-1))

    cats = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: cats.append(1) or real_cat(*a, **k))
    whole = run(lambda p, n: split_heads(p, n, 4))
    assert not cats and whole.is_contiguous() and whole.dtype == dtype
    ref = run(chunked)
    torch.testing.assert_close(whole, ref, rtol=0, atol=0)
    summed = run(lambda p, n: split_heads(p, n, 4), twice=True)
    assert cats
    torch.testing.assert_close(summed, run(chunked, twice=True), rtol=0, atol=0)


def test_a_build_killed_midway_does_not_block_the_next(tmp_path, monkeypatch):
    # PyTorch's lock file and a half-written library, as a killed build leaves them: the next build
    # clears both (PyTorch's build would otherwise wait on its lock file forever)
    import torch.utils.cpp_extension

    monkeypatch.setenv("TRANSDUCE_CACHE", str(tmp_path))
    out = kernels.build_dir()
    lib = out / f"{kernels.NAME}.so"
    out.mkdir(parents=True)
    (out / "lock").touch()
    lib.write_bytes(b"half a library")
    seen = []

    def compile_(name, sources, **kwargs):
        seen.append(((out / "lock").exists(), lib.exists(), kwargs["build_directory"]))
        lib.write_bytes(b"a library")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", compile_)
    assert kernels.build() == lib
    assert seen == [(False, False, str(out))]


def test_without_ninja_the_build_names_the_extra(tmp_path, monkeypatch):
    import torch.utils.cpp_extension as ext

    monkeypatch.setenv("TRANSDUCE_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(ext, "is_ninja_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"ninja is not installed: pip install 'transduce\[fast\]'"):
        kernels.build()
