"""The benchmark's plots, drawn beside its JSON; matplotlib is imported here only (Agg)."""

from __future__ import annotations


def batch_plot(runs: list[dict], path: str) -> None:
    """Tokens/s against batch size (log 2 axis), a line per cache mode, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    for cache in dict.fromkeys(r["cache"] for r in runs):
        points = sorted((r["batch"], r["tokens_per_s"]) for r in runs if r["cache"] == cache)
        ax.plot([b for b, _ in points], [t for _, t in points], marker="o", label=f"cache {cache}")
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in runs})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_ylim(bottom=0)
    ax.set(xlabel="batch size (rows)", ylabel="tokens/s", title="Tokens/s against batch size, by cache mode")
    ax.legend()
    fig.savefig(path, format="png", dpi=100)
