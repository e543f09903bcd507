"""Draws docs/ha.png, the replicated controller's topology (``make ha-picture``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "ha.png"


def box(ax, x, y, w, h, text, color):  # type: ignore[no-untyped-def]
    ax.add_patch(
        FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="#333", lw=1.2)
    )
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)


def arrow(ax, a, b, text="", color="#333", at=None, rad=0.0):  # type: ignore[no-untyped-def]
    ax.add_patch(
        FancyArrowPatch(
            a, b, arrowstyle="-|>", mutation_scale=12, color=color, lw=1.3,
            connectionstyle=f"arc3,rad={rad}",
        )
    )  # fmt: skip
    if text:
        x, y = at or ((a[0] + b[0]) / 2 + 0.1, (a[1] + b[1]) / 2)
        ax.text(x, y, text, fontsize=7.5, color=color)


def main() -> None:
    fig, ax = plt.subplots(figsize=(10.5, 6.2))
    ax.set_xlim(-0.9, 10)
    ax.set_ylim(0, 6.4)
    ax.axis("off")
    engine, log, replica, ops = "#dcecf9", "#fde7c8", "#d9f2d9", "#eee"
    # engines (each: vLLM or kvplane serve/engine + a worker per rank)
    for i, x in enumerate((0.4, 3.6)):
        box(
            ax,
            x,
            5.0,
            2.6,
            1.0,
            f"engine inst-{'ab'[i]}\nworker per rank\n(outbox, bounded)",
            engine,
        )
    # the JetStream cluster
    ax.add_patch(
        FancyBboxPatch(
            (0.3, 2.55),
            7.4,
            1.75,
            boxstyle="round,pad=0.03",
            fc="#fff7ea",
            ec="#c80",
            lw=1.2,
            ls="--",
        )
    )
    ax.text(
        0.45,
        4.1,
        "NATS JetStream cluster (3 nodes, streams with 3 replicas)",
        fontsize=8.5,
        color="#a60",
    )
    box(
        ax, 0.5, 2.75, 2.3, 1.1, "stream KVPLANE\nkvplane.w.<inst>.<rank>\nkvplane.ctl (reaps)", log
    )
    box(ax, 3.0, 2.75, 1.5, 1.1, "work queue\nKVPLANE_OPS", log)
    box(ax, 4.7, 2.75, 1.4, 1.1, "KV buckets\nlease, ops", log)
    box(ax, 6.25, 2.75, 1.35, 1.1, "object store\nsnapshots\n(@ log seq)", log)
    # replicas
    for i, x in enumerate((0.7, 4.3)):
        box(
            ax,
            x,
            0.35,
            2.9,
            1.25,
            f"controller replica r{i}\nfull index, /lookup, /status\n{'(holds the lease)' if i == 0 else ''}",
            replica,
        )
    box(ax, 8.1, 0.5, 1.7, 0.95, "routers,\noperators\n(HTTP)", ops)
    # flows: every replica (green), the lease holder only (red)
    arrow(ax, (1.7, 5.0), (1.5, 3.85), "register, heartbeat,\nnumbered reports", at=(1.75, 4.45))
    arrow(ax, (4.9, 5.0), (1.9, 3.85))
    arrow(ax, (1.3, 2.75), (1.3, 1.6), "ordered\nreplay", "#070", at=(0.55, 2.1))
    arrow(ax, (2.3, 2.75), (5.2, 1.6), "", "#070")
    arrow(ax, (2.0, 1.6), (2.0, 2.75), "ReapEvent", "#a00", at=(2.05, 2.1))
    arrow(ax, (3.75, 2.75), (3.0, 1.6), "ops", "#a00", at=(3.45, 2.3))
    arrow(ax, (5.7, 1.6), (3.9, 2.75), "ops", "#555", at=(4.85, 2.3))
    arrow(ax, (3.4, 1.4), (5.2, 2.75), "lease,\nstatus", "#a00", at=(4.35, 1.75))
    arrow(ax, (3.6, 1.0), (6.7, 2.75), "snapshot + trim", "#a00", at=(6.0, 1.9))
    arrow(ax, (7.1, 2.75), (7.1, 1.2), "join", "#070", at=(7.2, 2.0))
    arrow(ax, (7.1, 1.2), (7.2, 1.2))
    arrow(ax, (8.1, 1.0), (7.25, 1.0), "", "#555")
    arrow(
        ax, (0.7, 0.9), (0.4, 5.3), "commands to\nworkers (ZMQ)", "#a00", at=(-0.75, 3.2), rad=-0.35
    )
    ax.text(
        0.3, 0.05,
        "green: every replica consumes the log in order; red: only the lease holder (reap, run ops once, snapshot, trim)",
        fontsize=7.5, color="#333",
    )  # fmt: skip
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(OUT)


if __name__ == "__main__":
    main()
