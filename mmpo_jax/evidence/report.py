"""``EVIDENCE.md`` and ``results.json`` of a study: the protocol first, then the tables.

Tables: the chosen settings (with every candidate's validation numbers), the test metrics as
mean ± std over seeds, per-split POPE, the paired differences against the control and DPO with
their 95% intervals (a **gain** only where the interval excludes 0), and one table per paper
claim with its verdict. Numbers are the study's; nothing here chooses or filters.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from mmpo_jax.engine.disk import write_atomic
from mmpo_jax.evidence import statistics
from mmpo_jax.evidence.rows import ROWS

RESULTS_FILE = "results.json"
REPORT_FILE = "EVIDENCE.md"

MAIN_COLUMNS = (
    ("sampled/chair_i", "CHAIR_i sampled"), ("sampled/chair_s", "CHAIR_s sampled"),
    ("sampled/recall", "recall sampled"), ("sampled/partner_rate", "partner sampled"),
    ("chair_i", "CHAIR_i"), ("chair_s", "CHAIR_s"), ("recall", "recall"),
    ("partner_rate", "partner"), ("continuation_prob", "P(continue)"),
    ("pope_accuracy", "POPE acc"), ("pope_f1", "POPE F1"), ("pope_yes_ratio", "POPE yes"),
    ("logp_change/chosen", "Δ log p chosen"), ("logp_change/rejected", "Δ log p rejected"),
)
LENGTH_COLUMNS = (
    ("sampled/mentions_per_caption", "mentions / caption sampled"),
    ("mentions_per_caption", "mentions / caption"),
    ("sampled/recall", "recall sampled"), ("sampled/chair_i", "CHAIR_i sampled"),
)
TRAINING_COLUMNS = (
    ("train/rewards/accuracy", "reward accuracy"), ("train/rewards/margins", "reward margin"),
    ("train/rewards/chosen", "chosen reward"), ("train/rewards/rejected", "rejected reward"),
    ("logp_change/chosen", "Δ log p chosen"), ("logp_change/rejected", "Δ log p rejected"),
)
HEADLINE_COLUMNS = (
    ("sampled/chair_i", "CHAIR_i sampled"), ("sampled/recall", "recall sampled"),
    ("chair_i", "CHAIR_i greedy"), ("pope_f1", "POPE F1"), ("logp_change/chosen", "Δ log p chosen"),
)
POPE_COLUMNS = tuple((f"pope_{split}_{name}", f"{split} {label}")
                     for split in ("random", "popular", "adversarial")
                     for name, label in (("accuracy", "acc"), ("f1", "F1"), ("yes_ratio", "yes")))


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _cell(summary: Mapping[str, Mapping[str, float]], key: str) -> str:
    if key not in summary:
        return "-"
    entry = summary[key]
    return f"{entry['mean']:.3f} ± {entry['std']:.3f}" if entry["n"] > 1 else f"{entry['mean']:.3f}"


def metrics_table(rows: Mapping[str, Any], columns: Sequence[tuple[str, str]]) -> str:
    shown = [(k, h) for k, h in columns if any(k in r["summary"] for r in rows.values())]
    return _table(["row", *(h for _, h in shown)],
                  [[r["label"], *(_cell(r["summary"], k) for k, _ in shown)] for r in rows.values()])


def headline_table(rows: Mapping[str, Any]) -> str:
    """The main rows' primary metrics (mean ± std) and their sampled-CHAIR_i differences to the
    control and to DPO (95% interval): the table the README shows."""
    key = statistics.PRIMARY.key
    lines = [[r["label"], *(_cell(r["summary"], k) for k, _ in HEADLINE_COLUMNS),
              *(_difference(r["paired"].get(reference, {}).get(key))
                for reference in ("control", "dpo"))]
             for r in rows.values()]
    return _table(["row", *(h for _, h in HEADLINE_COLUMNS),
                   "vs control, CHAIR_i sampled", "vs DPO, CHAIR_i sampled"], lines)


def _difference(entry: Mapping[str, Any] | None) -> str:
    if entry is None:
        return "-"
    mark = {"gain": " **gain**", "loss": " *loss*"}.get(entry["verdict"], "")
    return f"{entry['estimate']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}]{mark}"


def paired_table(rows: Mapping[str, Any], reference: str) -> str:
    metrics = statistics.PAIRED_METRICS
    lines = [[r["label"], *(_difference(r["paired"].get(reference, {}).get(m.key)) for m in metrics)]
             for key, r in rows.items() if key != reference]
    return _table(["row", *(m.label for m in metrics)], lines)


def selection_table(selection: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    lines = []
    for key, choice in selection.items():
        for candidate in choice["candidates"]:
            chosen = candidate["settings"] == choice["settings"]
            settings = ", ".join(f"{k}={v:g}" for k, v in candidate["settings"].items())
            note = ("**chosen**" if choice["eligible"] else "**chosen (no setting kept recall)**"
                    ) if chosen else ""
            lines.append([labels[key], settings, f"{candidate['chair_i']:.3f}",
                          f"{candidate['recall']:.3f}", f"{choice['recall_floor']:.3f}", note])
    return _table(["row", "settings", "val CHAIR_i sampled", "val recall sampled", "recall floor",
                   ""], lines)


def claim_section(claim: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    lines = [[labels[c["better"]], labels[c["worse"]], c["metric"], _difference(c)]
             for c in claim["comparisons"]]
    return (f"### {claim['title']}\n\n**Verdict: {claim['verdict']}** on this benchmark.\n\n"
            + _table(["row", "against", "metric", "difference [95% CI]"], lines))


def protocol_text(results: Mapping[str, Any]) -> str:
    p = results["protocol"]
    grid = (f"learning rate in {{{', '.join(f'{x:g}' for x in p['learning_rates'])}}}, beta in "
            f"{{{', '.join(f'{x:g}' for x in p['betas'])}}} where the method has one")
    return "\n".join([
        "## Protocol", "",
        f"- **Rows**: {', '.join(r['label'] for r in results['rows'].values())}.",
        f"- **Budget**: every trained row makes {p['updates']} optimizer updates on batches of "
        f"{p['batch_size']} sequences (preference rows: pairs; the control: chosen captions). "
        f"FiSAO's PPO epochs count: it runs updates / rollout.ppo_epochs rollout steps of "
        f"{p['batch_size']} sampled captions, each followed by ppo_epochs updates over the batch.",
        f"- **Selection**: {grid}, the same grid for every main row (the control included), "
        f"trained with seed {p['seeds'][0]} and evaluated on the **validation** splits "
        f"({results['validation_splits']['caption']}/{results['validation_splits']['pope']} of "
        f"world {results['validation_splits']['builder']}); chosen: the lowest sampled CHAIR_i "
        f"among settings whose sampled recall is at least the SFT base's minus "
        f"{p['recall_tolerance']}. Ablation rows inherit their parent's settings. Nothing is "
        "chosen on a test split.",
        f"- **Measurement**: seeds {p['seeds']} at the chosen settings, evaluated on the test "
        "splits: CHAIR_s, CHAIR_i, recall (greedy, and sampled at temperature 1 over several "
        "passes), the partner rate, POPE accuracy / F1 / yes-ratio per split, and the change of "
        "the chosen and rejected responses' log-probability (nats, summed over the response, "
        f"mean over {p['logp_records']} preference records) from the SFT base.",
        "- **Statistics**: mean ± std over seeds; each row's paired difference to the control and "
        f"to DPO with a 95% bootstrap interval over images and seeds ({p['bootstrap_samples']} "
        "resamples); a difference is a **gain** only where its interval excludes 0.",
    ])


def markdown(results: Mapping[str, Any]) -> str:
    rows = results["rows"]
    labels = {key: r["label"] for key, r in rows.items()}
    context = {"main": set(), "ablation": {"base", "dpo", *(r.parent for r in ROWS.values())},
               "decoding": {"base", *(r.model_of for r in ROWS.values())}}
    groups = {g: {k: r for k, r in rows.items() if r["group"] == g or k in context[g]}
              for g in context}
    parts = [
        "# Evidence: which methods make the tiny LLaVA hallucinate less", "",
        f"Command: `{results['command']}`  ",
        f"mmpo_jax {results['version']}, commit {results['commit']}, {results['finished']}, "
        f"wall time of this invocation {results['wall_s'] / 60:.1f} min (load {results['load']}); "
        f"its {results['runs']} training runs and evaluations took {results['runs_s'] / 60:.1f} "
        "min in all, summed over their own wall times across resumed invocations (the SFT "
        "base's training not counted once cached).  ",
        f"World: builder options `{json.dumps(results['protocol']['world'])}`; full spec "
        f"`{json.dumps(results['world_spec'])}`.", "",
        protocol_text(results), "",
        "## Headline (test splits; lower CHAIR is better)", "", headline_table(groups["main"]), "",
        "## Chosen settings (validation)", "", selection_table(results["selection"], labels), "",
        "## Test metrics (mean ± std over seeds)", "", metrics_table(groups["main"], MAIN_COLUMNS),
        "",
    ]
    for group, title in (("ablation", "Ablations (parent's settings), with their parents"),
                         ("decoding", "ADAPT's decodings (greedy, no training), with their models")):
        if any(r["group"] == group for r in groups[group].values()):
            parts += [f"### {title}", "", metrics_table(groups[group], MAIN_COLUMNS), ""]
    parts += ["### POPE per split", "", metrics_table(rows, POPE_COLUMNS), ""]
    parts += ["### Caption length (does a row only say less?)", "",
              metrics_table(rows, LENGTH_COLUMNS), ""]
    trained = {k: r for k, r in rows.items() if any(k2.startswith("train/") for k2 in r["summary"])}
    if trained:
        parts += ["### Where each preference row's margin comes from (mean of the last "
                  f"{results.get('end_window', 1)} logged training steps; implicit rewards are beta x "
                  "the log-ratio to the reference; Δ log p: nats from the SFT base)", "",
                  metrics_table(trained, TRAINING_COLUMNS), ""]
    for reference, title in (("control", "the control"), ("dpo", "DPO")):
        parts += [f"## Paired differences to {title} (row minus {title}, 95% interval)", "",
                  paired_table(rows, reference), ""]
    if results["claims"]:
        parts += ["## The papers' claims", ""]
        for claim in results["claims"]:
            parts += [claim_section(claim, labels), ""]
    if results.get("plots"):
        parts += ["## Plots", ""] + [f"![{name}]({name})" for name in results["plots"]] + [""]
    return "\n".join(parts)


def write(out: pathlib.Path, results: Mapping[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / RESULTS_FILE, json.dumps(results, indent=1, default=float))
    write_atomic(out / REPORT_FILE, markdown(results))
