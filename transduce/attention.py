"""Cross-attention a person can look at.

`cross_attention` re-reads a decoded output through the model's own decoder
step with attention recording on (teacher forcing the output), so it works
for every family that decodes, with no family-specific code. Plotting needs
matplotlib (the `plot` extra), imported only by `plot_attention`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from transduce.data.pipeline import pad
from transduce.data.vocab import BOS, PAD


@torch.no_grad()
def cross_attention(model, src_ids: list[int], out_ids: list[int]) -> torch.Tensor:
    """Attention of each output step (the outputs then </s>) over the source: (layers, heads, T, S)."""
    src = pad([src_ids])
    memory = model.encode(src, src != PAD)
    state = model.init_state(memory, 1, len(out_ids) + 2, record_attention=True)
    for tok in [BOS] + list(out_ids):
        _, state = model.step(torch.tensor([tok]), state)
    steps = state.attention  # per step: per layer (1, H, S) or None
    if not steps or steps[0][0] is None:
        raise ValueError(f"model family {getattr(model.config, 'family', '?')!r} "
                         f"({getattr(model.config, 'attention', '')}) has no cross-attention to show")
    layers = len(steps[0])
    return torch.stack([torch.stack([step[layer][0] for step in steps], 1) for layer in range(layers)])


def attention_records(run, sources: list[str], outputs: list[str]) -> list[dict]:
    """JSON-ready records: tokens of both sides and attention[layer][head][t][s]."""
    records = []
    for source, output in zip(sources, outputs):
        src_ids, out_ids = run.source.encode(source), run.target.encode(output)
        if not src_ids:
            records.append({"source": source, "output": output, "source_tokens": [], "output_tokens": [],
                            "attention": []})
            continue
        att = cross_attention(run.model, src_ids, out_ids)
        records.append({
            "source": source, "output": output,
            "source_tokens": [run.source.vocab.itos[i] for i in src_ids],
            "output_tokens": [run.target.vocab.itos[i] for i in out_ids] + ["</s>"],
            "attention": [[[[round(float(x), 5) for x in row] for row in head] for head in layer]
                          for layer in att],
        })
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def select(att: torch.Tensor, layer: str, head: str) -> tuple[torch.Tensor, str]:
    """(T, S) matrix from (layers, heads, T, S): a layer index or 'mean', a head index or 'mean'."""
    n_layers, n_heads = att.shape[:2]

    def pick(x, which, n, what, dim):
        if which == "mean":
            return x.mean(dim), f"{what}s averaged"
        i = int(which)
        if not -n <= i < n:
            raise ValueError(f"--{what} {i}: the model has {n} {what}s (0..{n - 1}, or mean)")
        return x.select(dim, i), f"{what} {i % n}"

    x, layer_label = pick(att, layer, n_layers, "layer", 0)
    x, head_label = pick(x, head, n_heads, "head", 0)
    return x, f"{layer_label}, {head_label}"


def plot_attention(matrix: torch.Tensor, src_tokens: list[str], out_tokens: list[str], title: str,
                   path: Path) -> None:
    """Heatmap: source tokens across, output tokens down."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'transduce[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, s = matrix.shape
    fig, ax = plt.subplots(figsize=(max(3.0, 0.45 * s + 1.5), max(2.5, 0.4 * t + 1.2)))
    im = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(s), [tok.replace(" ", "␣") for tok in src_tokens])
    ax.set_yticks(range(t), out_tokens)
    ax.set_xlabel("source")
    ax.set_ylabel("output")
    ax.tick_params(axis="x", labeltop=True, labelbottom=False, rotation=90)
    ax.set_title(title, fontsize=9, pad=24)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
