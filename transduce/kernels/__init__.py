"""CPU kernels for inference and training attention, compiled on first use and cached per machine.

`attention.cpp` does a whole attention (scores, softmax, weighted values,
merged heads) in one pass: a decoding step's attention is a few dozen keys
per query, where PyTorch's batched matmuls spend most of their time setting
up tiny products. Its `self_step` writes a decoding step's keys and values
into the cache (adding their projection's bias) and attends in the same
pass, reading beam search's cache through a table of ancestors rather than
having it copied per step; `attend_step` takes a step's queries as (rows,
d_model). `norm.cpp` adds a residual, a projection's bias and a LayerNorm in
one pass. `linear.cpp` runs a feed-forward block in row blocks whose hidden
layer stays in the core's cache, and int8 linear layers (models/quantize.py):
rows quantized, multiplied by `torch._int_mm` and scaled back in one call
(on a CPU with AMX int8, on the tiles directly, weights packed once in their
layout: `int8_tiles`, `int8_pack`).
The `kernels` engine (transduce/engine/kernels.py) runs inference on them. `attention_train.cpp` is attention with gradients (forward keeping the
probabilities, backward from them) for training on short rows, where
PyTorch's flash kernel spends most of its time setting up blocks
(`attend_train`, used by models/layers.py's `Attention` whenever gradients
are needed and there is no attention dropout). `dropout.cpp` is inverted
dropout in one pass whose mask is a hash of a seed and the element's index,
so the backward pass recomputes it instead of storing it (`dropout`).
`gelu_train.cpp` is a projection's bias and its GELU or ReLU for training,
whose forward pass writes the derivative over its input, so the backward pass
is a product written over it, with the bias's gradient summed on the way
(`bias_act`, used by models/layers.py's `FeedForward`).
`norm_train.cpp` is a post-norm layer's residual, dropout and LayerNorm
with gradients, its result in float32 and, under bf16 autocast, in bf16 for
the next projections (`add_norm_train`, used by models/layers.py's
`Residual`).
`search.cpp` does a decoding step's bookkeeping in one call (`greedy_pick`,
`beam_advance`, used by search.py): with decoding workers on threads, each
small op of a step waited for the interpreter lock behind the others.

The kernels are built with PyTorch's C++ extension builder (g++ and ninja: the `fast` extra) into
`$TRANSDUCE_CACHE/kernels/<key>` (default `~/.cache/transduce`), the key
naming the sources, the PyTorch version and the CPU. `make install` builds them
(`python -m transduce.kernels`); without a compiler, or with
`TRANSDUCE_KERNELS=0`, inference and training use PyTorch's ops (and say so once).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger("transduce")

SOURCES = [Path(__file__).with_name(f)
           for f in ("attention.cpp", "attention_train.cpp", "norm.cpp", "norm_train.cpp", "linear.cpp", "dropout.cpp",
                     "gelu_train.cpp", "search.cpp")]
HEADERS = [Path(__file__).with_name(f) for f in ("rows.h", "dropout_mask.h")]  # included by the sources: part of the build's key
NAME = "transduce_kernels"
# -ffast-math vectorises exp (glibc libmvec); the kernel keeps every value finite for it.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
LDFLAGS = ["-fopenmp"]

_state: dict = {}  # "ops": the loaded op namespace or None once tried


def enabled() -> bool:
    return os.environ.get("TRANSDUCE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build_dir() -> Path:
    """Where this machine's build lives: one folder per source, PyTorch version, flags and CPU."""
    root = Path(os.environ.get("TRANSDUCE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                           Path.home() / ".cache") / "transduce")
    h = hashlib.sha256()
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS), torch.__version__.encode(), " ".join(CFLAGS).encode(), _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return root / "kernels" / h.hexdigest()[:16]


def build(verbose: bool = False) -> Path:
    """Compile (if not yet built here) and load the kernels; returns the shared library's path."""
    out = build_dir()
    lib = out / f"{NAME}.so"
    if lib.exists():
        try:
            torch.ops.load_library(str(lib))
            return lib
        except OSError:  # another process is still writing it: the build below waits on its lock
            pass
    from torch.utils.cpp_extension import is_ninja_available, load

    if not is_ninja_available():
        raise RuntimeError("ninja is not installed: pip install 'transduce[fast]' (ninja and a C++ compiler build "
                           "the kernels)")
    out.mkdir(parents=True, exist_ok=True)
    with _build_lock(out):
        if lib.exists():  # another process built it while this one waited
            try:
                torch.ops.load_library(str(lib))
                return lib
            except OSError:  # half written by a build that was killed
                lib.unlink()
        # PyTorch's own lock file, left behind by a build that was killed (SIGKILL, OOM, power): every
        # later build would wait on it forever. Holding our lock, no live build owns it.
        (out / "lock").unlink(missing_ok=True)
        log.info("compiling transduce's CPU kernels into %s (once per machine, ~25 s)", out)
        t = time.perf_counter()
        load(NAME, [str(f) for f in SOURCES], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, build_directory=str(out),
             is_python_module=False, verbose=verbose)
        log.info("kernels compiled in %.0f s", time.perf_counter() - t)
    return lib


@contextlib.contextmanager
def _build_lock(out: Path):
    """One build at a time in `out`, by an OS lock that dies with its process (where fcntl exists)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: PyTorch's lock file alone
        yield
        return
    with open(out / "build.flock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def override(**values):
    """Within the block, `ops()` and `int8_tiles()` answer the given values instead of this machine's:
    `override(ops=None)` (or `disabled()`) runs everything on PyTorch's ops, as on a machine without the
    kernels; `ops=` another namespace and `tiles=` stand in for a kernel build (tests of the AMX path
    on emulated tiles)."""
    unknown = set(values) - {"ops", "tiles"}
    if unknown:
        raise TypeError(f"override: unknown switches {sorted(unknown)}; valid: ops, tiles")
    saved = dict(_state)
    _state.update(values)
    try:
        yield
    finally:
        _state.clear()
        _state.update(saved)


def disabled():
    """A block in which PyTorch's ops run instead of the kernels (`TRANSDUCE_KERNELS=0` for a process)."""
    return override(ops=None)


def ops():
    """`torch.ops.transduce` with the kernels loaded, or None (disabled, or the build failed)."""
    if not enabled():
        return None
    if "ops" not in _state:
        _state["ops"] = None
        if enabled():
            try:
                build()
                _state["ops"] = torch.ops.transduce
            except Exception as e:  # no compiler, no ninja, a read-only cache: PyTorch's ops still work
                log.warning("transduce: CPU kernels unavailable (%s: %s); PyTorch's ops are used instead "
                            "(set TRANSDUCE_KERNELS=0 to skip the attempt)", type(e).__name__,
                            str(e).strip().splitlines()[-1] if str(e).strip() else "")
    return _state["ops"]


def int8_tiles() -> bool:
    """Whether the int8 ops run on AMX tiles here (built for a CPU with AMX int8 and granted the tiles
    by the OS), taking weights in `int8_pack`'s layout; `TRANSDUCE_AMX=0` keeps them on `_int_mm`."""
    if "tiles" not in _state:
        o = ops()
        _state["tiles"] = bool(o is not None and os.environ.get("TRANSDUCE_AMX", "1") != "0" and o.int8_tiles())
    return _state["tiles"]


_NO_MASK = torch.empty(0, dtype=torch.bool)


def _key_padding(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 dtypes: tuple = (torch.float32,)) -> torch.Tensor | None:
    """The kernels' (M, Tk) mask (empty for none) if they apply to these tensors, else None.

    They take CPU tensors of one of `dtypes` (all three the same) whose
    innermost dim is contiguous, and a key-padding mask: bool (M, 1, 1, Tk),
    True = attend; and they must have been built.
    """
    if q.device.type != "cpu" or not (q.dtype == k.dtype == v.dtype and q.dtype in dtypes):
        return None
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    m = _NO_MASK
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1:3] != (1, 1) \
                or mask.shape[0] != k.shape[0] or mask.shape[3] != k.shape[2]:
            return None
        m = mask[:, 0, 0, :]
    return m if ops() is not None else None


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, group: int,
           causal: bool, scale: float) -> torch.Tensor | None:
    """The fused kernel's attention (N, H, Tq, dh), or None where it does not apply.

    q (N, H, Tq, dh); k, v (M, H, Tk, dh) with N = M * group; mask None or
    bool (M, 1, 1, Tk), True = attend. It applies to float32 CPU tensors
    that need no gradient; anything else (other masks, autograd, other
    devices) is left to the caller's PyTorch path. No dropout: the caller
    checks.
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    m = _key_padding(q, k, v, mask)
    if m is None:
        return None
    n, h, tq, dh = q.shape
    return ops().attend(q, k, v, m, group, causal, scale).view(n, tq, h, dh).transpose(1, 2)


class _TrainAttention(torch.autograd.Function):
    """attention_train.cpp's forward (keeping the probabilities) and backward. Where q, k and v are the
    split heads of one fused projection (or k and v are), the backward pass writes their gradients
    side by side in one buffer of the projection's shape, which `models.layers.split_heads` hands
    on whole: no concatenation (one per layer, ~1% of a training step)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale):
        out, probs = ops().attention_train(q, k, v, mask, causal, scale)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return out  # (B, Tq, H * dh)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, probs = ctx.saved_tensors
        b, h, tq, dh = q.shape
        tk, d = k.shape[2], h * dh
        if grad.stride(-1) != 1:  # e.g. the expanded gradient of a sum
            grad = grad.contiguous()
        g = grad.unflatten(-1, (h, dh)).transpose(1, 2)  # (B, H, Tq, dh)
        parts = fused_parts(q, k, v)
        if parts == 3:  # (B, T, 3D): dq, dk, dv in its column blocks
            buf = q.new_empty(b, tq, 3 * d)
            dq, dk, dv = (buf[..., i * d:(i + 1) * d].unflatten(-1, (h, dh)) for i in range(3))
        else:
            dq = q.new_empty(b, tq, h, dh)
            kv = q.new_empty(b, tk, 2 * d) if parts == 2 else None
            dk, dv = ((kv[..., i * d:(i + 1) * d].unflatten(-1, (h, dh)) for i in range(2)) if kv is not None
                      else (q.new_empty(b, tk, h, dh), q.new_empty(b, tk, h, dh)))
        ops().attention_train_backward_into(g, q, k, v, probs, ctx.scale, dq, dk, dv)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None, None


def fused_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """3 if q, k, v (B, H, T, dh) are the split heads of one (B, T, 3 * H * dh) tensor, in that order;
    2 if k and v are those of one (B, Tk, 2 * H * dh); else 0."""
    def follows(a, b, n):  # b's columns right after a's, both column blocks of a (B, T, n * d) tensor
        b_, h, t, dh = a.shape
        return (a.shape == b.shape and a.stride() == b.stride() == (t * n * h * dh, dh, n * h * dh, 1)
                and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
                and b.storage_offset() - a.storage_offset() == h * dh)
    if follows(q, k, 3) and follows(k, v, 3):
        return 3
    return 2 if follows(k, v, 2) else 0


# Keys per row up to which training attention runs on the kernel: up to 32 its sums stay in
# registers and it beats PyTorch's flash kernel; beyond, flash's blocking wins (docs/history.md,
# "Attention training on our kernel").
TRAIN_MAX_KEYS = 32


def attend_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                 scale: float, max_keys: int | None = TRAIN_MAX_KEYS) -> torch.Tensor | None:
    """Attention with gradients on the training kernels: (B, H, Tq, dh), or None where they do not apply.

    q (B, H, Tq, dh), k, v (B, H, Tk, dh), innermost dim contiguous (the
    split heads of a projection); mask None or bool, True = attend: (B, 1,
    1, Tk) for padded keys or (B, 1, Tq, Tk) per query (the single-stack
    families' masks). CPU tensors, all float32 or all bfloat16, no dropout
    (the caller checks). The result is a view of heads merged in memory, so
    merging them again costs no copy; so are the gradients of q, k and v.
    Rows of more than `max_keys` keys are left to PyTorch (None: any length).

    bfloat16 in (bf16 autocast's projections) gives bfloat16 out and
    bfloat16 gradients, the arithmetic in float32 inside the kernel: no
    casts on either side (they were 5% of a G2P training step), and the
    same numbers as casting up, running in float32 and casting back, which
    the output projection and the gradients' casts did before.
    """
    if k.shape[0] != q.shape[0] or k.shape[2] == 0 or (max_keys is not None and k.shape[2] > max_keys):
        return None
    half = (torch.bfloat16, torch.float32)
    if not (q.dtype == k.dtype == v.dtype) and {q.dtype, k.dtype, v.dtype} <= set(half):
        q, k, v = q.float(), k.float(), v.float()  # mixed: all in float32
    per_query = (mask is not None and mask.dtype == torch.bool and mask.dim() == 4
                 and mask.shape[:2] == (k.shape[0], 1) and mask.shape[2:] == (q.shape[2], k.shape[2])
                 and q.shape[2] > 1)
    m = _key_padding(q, k, v, None if per_query else mask, half)
    if m is None:
        return None
    if per_query:
        m = mask[:, 0]  # (B, Tq, Tk)
    b, h, tq, dh = q.shape
    return _TrainAttention.apply(q, k, v, m, causal, scale).view(b, tq, h, dh).transpose(1, 2)


class _Dropout(torch.autograd.Function):
    """dropout.cpp: the backward pass applies the forward's mask (the same seed) to the gradient."""

    @staticmethod
    def forward(ctx, x, seed, threshold, scale):
        ctx.args = (seed, threshold, scale)
        return ops().dropout_apply(x, seed, threshold, scale)

    @staticmethod
    def backward(ctx, grad):
        return ops().dropout_apply(grad, *ctx.args), None, None, None


def dropout(x: torch.Tensor, threshold: int) -> torch.Tensor | None:
    """Inverted dropout of the elements whose random byte is below `threshold` (p = threshold / 256),
    kept ones scaled by 256 / (256 - threshold); None where the kernel does not apply (not a float32
    or bfloat16 CPU tensor, or no kernels). The seed comes from torch's default generator, so a run
    that restores its generator state draws the same masks again."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or ops() is None:
        return None
    seed = int(torch.empty((), dtype=torch.int64).random_())
    return _Dropout.apply(x, seed, threshold, 256.0 / (256 - threshold))


ACTIVATIONS = {"relu": 1, "gelu": 2, "silu": 3}  # gelu_train.cpp's codes
GATED = ("gelu", "silu")  # the gates bias_act's `glu` takes: GEGLU and SwiGLU


class _BiasAct(torch.autograd.Function):
    """gelu_train.cpp: a projection's bias and its activation in one pass, which writes the derivative
    (over its input where `overwrite`); the backward pass writes the gradient over the derivative and
    sums the bias's gradient as it goes."""

    @staticmethod
    def forward(ctx, x, bias, act, overwrite, glu):
        op = ops().bias_glu_train if glu else ops().bias_act_train
        y, d = op(x, None if bias is None else bias.float(), ACTIVATIONS[act], overwrite)
        ctx.d = d  # not save_for_backward: the backward pass writes over it, so it runs once
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad):
        d, ctx.d = ctx.d, None
        if d is None:
            raise RuntimeError("the activation kernel's backward pass ran twice: its first run wrote the gradient "
                               "over the derivative it keeps (backward with retain_graph=True is not supported here)")
        want_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[1]
        dx, db = ops().act_backward(grad.contiguous(), d, want_bias)
        return dx, db.to(ctx.bias_dtype) if want_bias else None, None, None, None


def bias_act(x: torch.Tensor, bias: torch.Tensor | None, act: str, overwrite: bool = False,
             glu: bool = False) -> torch.Tensor | None:
    """act(x + bias) (act "relu" or "gelu", the erf form) for a pass that needs gradients: one pass each
    way that moves as few bytes as it can (the derivative written by the forward pass, the gradient
    written over it, the bias's gradient summed on the way). `overwrite`: x is a projection's fresh
    output that nothing else reads, and the derivative goes into its memory. None where the kernel
    does not apply (not a float32 or bfloat16 CPU tensor, or no kernels). GELU in float32: within
    5e-7 of the exact values; in bf16, x + bias is rounded to bf16 (as an addmm's output would be)
    and GELU and its derivative are looked up in a table of their exact values, rounded once
    (PyTorch's bf16 GELU agrees above x = -3 but for its own float32 rounding, and is less exact
    below, where its 1 + erf cancels). Under bf16 the gradient is rounded twice (the derivative,
    then the product) where PyTorch's rounds once.

    `glu`: a gated linear unit (act "gelu": GEGLU, "silu": SwiGLU; Shazeer 2020): x's last
    dimension holds the gate's projection, then the linear one's, and the result is act(gate) *
    linear, of half x's width; the forward pass keeps act'(gate) * linear and act(gate) where the
    derivative would be."""
    if act not in (GATED if glu else ("relu", "gelu")):
        kind = "gated " if glu else ""
        raise ValueError(f"unknown {kind}activation {act!r}; choose from {sorted(GATED if glu else ('relu', 'gelu'))}")
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or ops() is None:
        return None
    if overwrite and not x.is_contiguous():
        overwrite = False
    return _BiasAct.apply(x, bias, act, overwrite, glu)


def gelu(x: torch.Tensor) -> torch.Tensor | None:
    """GELU (the erf form) for a pass that needs gradients: `bias_act` without a bias."""
    return bias_act(x, None, "gelu")


class _AddNormTrain(torch.autograd.Function):
    """norm_train.cpp: LayerNorm(x + dropout(y)) as float32 and (half) bfloat16; the backward pass takes
    the gradients of both, recomputing the sum and the mask from x, y and the seed."""

    @staticmethod
    def forward(ctx, x, y, weight, bias, eps, seed, threshold, scale, half):
        out, out16, mean, rstd = ops().add_norm_train(x, y, weight, bias, eps, seed, threshold, scale, half)
        ctx.save_for_backward(x, y, weight, mean, rstd)
        ctx.args = (seed, threshold, scale)
        ctx.set_materialize_grads(False)
        if not half:
            ctx.mark_non_differentiable(out16)
        return out, out16

    @staticmethod
    def backward(ctx, g, g16):
        x, y, weight, mean, rstd = ctx.saved_tensors
        g = _NO_GRAD if g is None else g.contiguous()
        g16 = _NO_GRAD16 if g16 is None else g16.contiguous()
        dx, dy, dw, db = ops().add_norm_train_backward(g, g16, x, y, weight, mean, rstd, *ctx.args)
        return dx, dy, dw, db, None, None, None, None, None


_NO_GRAD = torch.empty(0)
_NO_GRAD16 = torch.empty(0, dtype=torch.bfloat16)


def add_norm_train(x: torch.Tensor, y: torch.Tensor, norm: torch.nn.LayerNorm,
                   threshold: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A post-norm residual for training: (LayerNorm(x + dropout(y)), its bf16 rounding or None), or None
    where the kernel does not apply.

    x (..., D) float32 (the residual stream), y of x's shape, float32 or
    bfloat16 (a sublayer's output; bf16 under bf16 autocast). Dropout drops
    the elements of y whose random byte is below `threshold` (0: none) with
    `dropout`'s mask, the seed drawn from torch's generator as there. Under
    bf16 autocast the result comes in bf16 too, for the projections that read
    it next: given it, they skip autocast's cast, and their gradients come
    back to the kernel in bf16 (models/layers.py's `bf16_twin`).
    """
    w, b = norm.weight, norm.bias
    if (ops() is None or x.device.type != "cpu" or x.dtype != torch.float32 or y.shape != x.shape
            or y.dtype not in (torch.float32, torch.bfloat16) or w is None or b is None
            or w.dtype != torch.float32 or b.dtype != torch.float32 or w.shape != x.shape[-1:]):
        return None
    half = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    seed = int(torch.empty((), dtype=torch.int64).random_()) if threshold else 0
    d = x.shape[-1]
    out, out16 = _AddNormTrain.apply(x.reshape(-1, d).contiguous(), y.reshape(-1, d).contiguous(), w, b, norm.eps,
                                     seed, threshold, 256.0 / (256 - threshold), half)
    return out.view(x.shape), (out16.view(x.shape) if half else None)
