"""The study's PNG plots (matplotlib, Agg backend: no display needed).

- ``bar_<metric>.png``: one bar per row, mean over seeds with the std as error bar;
- ``chair_vs_recall.png``: sampled CHAIR_i against sampled recall per row (greedy for ADAPT's
  decoding rows), error bars both ways: a method that only shortens captions moves left *and*
  down;
- ``curves.png``: loss, reward margin and the chosen implicit reward (beta x the chosen
  log-probability change against the reference, token-weighted where the method weights) over
  training, per trained main row (its first seed's run, ``metrics.jsonl``);
- ``probes.png``: Cat-PO's token weights over the SFT base's caption of one test image and
  ADAPT's anchor mask over that image (`probes`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from mmpo_jax.evidence.probes import Probes  # noqa: E402
from mmpo_jax.training.logging import read_metrics  # noqa: E402

BAR_METRICS = (("sampled/chair_i", "CHAIR_i sampled"), ("sampled/recall", "recall sampled"),
               ("chair_i", "CHAIR_i greedy"), ("recall", "recall greedy"),
               ("pope_f1", "POPE F1"), ("logp_change/chosen", "Δ log p chosen (nats)"))
CURVES = (("loss", ("loss/total", "loss/nll")), ("reward margin", ("rewards/margins",)),
          ("chosen implicit reward", ("rewards/chosen",)))


def _file(name: str) -> str:
    return name.replace("/", "_") + ".png"


def bar_chart(rows: Mapping[str, Any], key: str, label: str, path: pathlib.Path) -> bool:
    shown = [(r["label"], r["summary"][key]) for r in rows.values() if key in r["summary"]]
    if not shown:
        return False
    figure, axis = plt.subplots(figsize=(max(6.0, 0.6 * len(shown)), 4.0))
    axis.bar(range(len(shown)), [s["mean"] for _, s in shown], yerr=[s["std"] for _, s in shown],
             capsize=3, color="tab:blue")
    axis.set_xticks(range(len(shown)), [name for name, _ in shown], rotation=60, ha="right",
                    fontsize=7)
    axis.set_ylabel(label)
    axis.set_title(f"{label}: mean ± std over seeds (test)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def chair_vs_recall(rows: Mapping[str, Any], path: pathlib.Path) -> None:
    figure, axis = plt.subplots(figsize=(7.0, 5.5))
    for r in rows.values():
        summary = r["summary"]
        prefix = "sampled/" if "sampled/chair_i" in summary else ""
        if f"{prefix}chair_i" not in summary:
            continue
        x, y = summary[f"{prefix}recall"], summary[f"{prefix}chair_i"]
        axis.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt="o" if prefix else "s",
                      capsize=2, markersize=4)
        axis.annotate(r["label"], (x["mean"], y["mean"]), fontsize=6, xytext=(3, 3),
                      textcoords="offset points")
    axis.set_xlabel("recall (sampled; squares: greedy ADAPT decodings)")
    axis.set_ylabel("CHAIR_i (sampled; squares: greedy)")
    axis.set_title("hallucination against recall, test split (lower right is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def training_curves(rows: Mapping[str, Any], path: pathlib.Path) -> bool:
    runs = {r["label"]: r["train_dirs"][0] for r in rows.values()
            if r["group"] == "main" and r["train_dirs"]}
    if not runs:
        return False
    figure, axes = plt.subplots(1, len(CURVES), figsize=(5.0 * len(CURVES), 4.0))
    for label, workdir in runs.items():
        records = read_metrics(workdir)
        for axis, (title, names) in zip(axes, CURVES):
            name = next((n for n in names if any(n in r for r in records)), None)
            if name is None:
                continue
            points = [(r["step"], r[name]) for r in records if name in r]
            axis.plot(*zip(*points), label=label, linewidth=1, marker=".", markersize=3)
            axis.set_title(title)
            axis.set_xlabel("optimizer step (FiSAO: rollout step)")
    axes[0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def probe_maps(probes: Probes, path: pathlib.Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11.0, 3.8),
                                         gridspec_kw={"width_ratios": [2.2, 1]})
    image = left.imshow(probes.weights[None, :], cmap="viridis", aspect="auto")
    left.set_xticks(range(len(probes.tokens)), probes.tokens, rotation=60, ha="right", fontsize=8)
    left.set_yticks([])
    left.set_title("Cat-PO token weights (SFT base as reference) over its caption")
    figure.colorbar(image, ax=left, fraction=0.05)
    right.imshow(probes.image)
    right.imshow(probes.anchor_mask, cmap="magma", alpha=0.55, vmin=0.0, vmax=1.0)
    right.set_title("ADAPT anchor mask (I_VE keeps bright)", fontsize=9)
    right.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(out: pathlib.Path, rows: Mapping[str, Any], probes: Probes | None) -> list[str]:
    """Every plot of the module doc into ``out``; returns the file names written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    for key, label in BAR_METRICS:
        if bar_chart(rows, key, label, out / f"bar_{_file(key)}"):
            written.append(f"bar_{_file(key)}")
    chair_vs_recall(rows, out / "chair_vs_recall.png")
    written.append("chair_vs_recall.png")
    if training_curves(rows, out / "curves.png"):
        written.append("curves.png")
    if probes is not None:
        probe_maps(probes, out / "probes.png")
        written.append("probes.png")
    return written

