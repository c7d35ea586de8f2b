"""The study's phases, in order: selection on validation, measurement on test, statistics.

1. `select_settings`: the SFT base and every tuned row at every grid point, trained with the
   selection seed and evaluated on the **validation** splits only (this function builds no other
   splits); `selection.choose` picks each row's settings.
2. `measure`: every row at its chosen settings (an ablation at its parent's) for every seed,
   evaluated on the test splits; the SFT base evaluated with each seed's sampling key; the
   ADAPT decodings evaluated on the models of the rows whose decoding rows are asked for.
3. `summarise`: the row views, mean ± std over seeds, paired intervals against the control and
   DPO, the claims' verdicts (`statistics`).

`run_study` runs the three, computes the heat maps' data (`probes`) and writes the report and
the plots.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import subprocess
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

import mmpo_jax
from mmpo_jax.data.sources import load_split
from mmpo_jax.evaluation.chair import ChairCounts
from mmpo_jax.evidence import plots, probes, report, runs, selection, statistics
from mmpo_jax.evidence import rows as rows_lib
from mmpo_jax.evidence.protocol import test_splits, validation_splits
from mmpo_jax.evidence.rows import ROWS, Row
from mmpo_jax.training.logging import read_metrics

Evaluation = dict[str, Any]


def _settings_label(settings: Mapping[str, float]) -> str:
    return " ".join(f"{'lr' if k == 'learning_rate' else k}={v:g}" for k, v in settings.items())


def select_settings(study: runs.Study) -> tuple[dict[str, selection.Choice], Evaluation]:
    """Phase 1 (module doc): ``({row key: choice}, the base's validation evaluation)``."""
    protocol = study.protocol
    splits = validation_splits(protocol.world)
    seed = protocol.selection_seed
    tuned = [ROWS[key] for key in protocol.rows if ROWS[key].tuned]
    total = sum(len(protocol.grid(row)) for row in tuned)
    study.log(f"selection on {splits.caption}/{splits.pope} ({dict(splits.builder)}): "
              f"{total} runs")
    base = runs.evaluate(study, runs.BASE_MODEL, lambda: study.base, splits, seed, "SFT base")
    choices, done = {}, 0
    for row in tuned:
        candidates = []
        for settings in protocol.grid(row):
            done += 1
            label = f"[select {done}/{total}] {row.label} {_settings_label(settings)}"
            config = protocol.row_config(row, settings, seed, data_root=study.data_root)
            trained = runs.train(study, config, label)
            candidates.append((settings, runs.evaluate(study, trained.key, trained.model, splits,
                                                       seed, label)))
        choices[row.key] = selection.choose(candidates, base,
                                            recall_tolerance=protocol.recall_tolerance)
        study.log(f"  {row.label}: chose {_settings_label(choices[row.key].settings)}")
    return choices, base


def _decodings_of(key: str, keys: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(ROWS[k].decoding for k in keys if ROWS[k].model_of == key)


def measure(study: runs.Study, choices: Mapping[str, selection.Choice]
            ) -> dict[str, list[dict[str, Any]]]:
    """Phase 2 (module doc): ``{row key: [{"evaluation", "train" (record or None),
    "train_dir"} per seed]}`` for every row that has a model of its own."""
    protocol = study.protocol
    splits = test_splits(protocol.world)
    own = [ROWS[key] for key in protocol.rows if ROWS[key].model_of is None]
    total = len(own) * len(protocol.seeds)
    study.log(f"measurement on {splits.caption}/{splits.pope}: {total} runs")
    measured: dict[str, list[dict[str, Any]]] = {}
    done = 0
    for row in own:
        decodings = _decodings_of(row.key, protocol.rows)
        for seed in protocol.seeds:
            done += 1
            label = f"[test {done}/{total}] {row.label} seed {seed}"
            if not row.trains:
                evaluation = runs.evaluate(study, runs.BASE_MODEL, lambda: study.base, splits,
                                           seed, label, decodings)
                measured.setdefault(row.key, []).append(
                    {"evaluation": evaluation, "train": None, "train_dir": None})
                continue
            settings = choices[row.parent or row.key].settings
            config = protocol.row_config(row, settings, seed, data_root=study.data_root)
            trained = runs.train(study, config, label)
            evaluation = runs.evaluate(study, trained.key, trained.model, splits, seed, label,
                                       decodings)
            measured.setdefault(row.key, []).append(
                {"evaluation": evaluation, "train": trained.record,
                 "train_dir": str(trained.workdir)})
    return measured


def row_view(row: Row, metrics: Mapping[str, float]) -> dict[str, float]:
    """A row's own metrics from its model's evaluation: greedy and sampled names, or for a
    decoding row its decoding's (``adapt_steer/chair_i`` -> ``chair_i``)."""
    if row.decoding == "greedy":
        return {k: v for k, v in metrics.items()
                if not any(k.startswith(f"{d}/") for d in rows_lib.ADAPT_DECODINGS)}
    prefix = f"{row.decoding}/"
    return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}


def _items(row: Row, runs_of_row: list[dict[str, Any]], metric: statistics.Metric
           ) -> np.ndarray | None:
    view = metric.view if row.decoding == "greedy" else (
        row.decoding if metric.view == "greedy" else None)
    if view is None:
        return None
    per_seed = [statistics.view_items(r["evaluation"]["details"], view, metric.kind)
                for r in runs_of_row]
    return None if any(x is None for x in per_seed) else np.stack(per_seed)


TRAINING_END = ("rewards/accuracy", "rewards/margins", "rewards/chosen", "rewards/rejected")
"""Training metrics each trained row reports at the end of training (``train/<name>``)."""
END_WINDOW = 5
"""How many of a run's last logged training records ``train/<name>`` averages (one logged batch
of 32 pairs alone is noisy)."""


def training_end(workdir: str) -> dict[str, float]:
    """``{name: mean over the last END_WINDOW logged values}`` of `TRAINING_END` in a run's
    ``metrics.jsonl``; names the run does not log are left out."""
    records = [r for r in read_metrics(workdir) if any(name in r for name in TRAINING_END)]
    last = records[-END_WINDOW:]
    return {name: float(np.mean([r[name] for r in last])) for name in TRAINING_END
            if last and all(name in r for r in last)}


def _length_summary(row: Row, runs_of_row: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Object mentions per caption (greedy and sampled; a decoding row: its decoding's), mean ±
    std over seeds: a row that only shortens its captions lowers CHAIR_i with fewer mentions and
    a lower recall."""
    views = ((row.decoding, "mentions_per_caption"),)
    if row.decoding == "greedy":
        views += (("sampled", "sampled/mentions_per_caption"),)
    out = {}
    for view, name in views:
        per_seed = [statistics.view_items(r["evaluation"]["details"], view, "chair")
                    for r in runs_of_row]
        if per_seed and all(items is not None for items in per_seed):
            counts = [ChairCounts(*(int(x) for x in items.sum(0))) for items in per_seed]
            out[name] = statistics.mean_std([c.mentions / max(c.captions, 1) for c in counts])
    return out


def summarise(study_protocol: Any, measured: Mapping[str, list[dict[str, Any]]]
              ) -> dict[str, Any]:
    """Phase 3 (module doc): ``{"rows": {key: {...}}, "claims": [...]}``."""
    keys = study_protocol.rows
    runs_of = {key: measured[ROWS[key].model_of or key] for key in keys}
    rows: dict[str, Any] = {}
    for key in keys:
        row = ROWS[key]
        per_seed = [row_view(row, r["evaluation"]["metrics"]) for r in runs_of[key]]
        names = sorted(set.intersection(*(set(m) for m in per_seed)))
        summary = {name: statistics.mean_std([m[name] for m in per_seed]) for name in names}
        summary.update(_length_summary(row, runs_of[key]))
        trained = [r for r in runs_of[key] if r["train"] is not None and row.trains]
        for name in ("logp_change/chosen", "logp_change/rejected"):
            if trained:
                summary[name] = statistics.mean_std([r["train"][name] for r in trained])
        ends = [training_end(r["train_dir"]) for r in trained]
        for name in TRAINING_END:  # the objective's own view of the pairs as training ends
            if ends and all(name in end for end in ends):
                summary[f"train/{name}"] = statistics.mean_std([end[name] for end in ends])
        rows[key] = {"label": row.label, "group": row.group, "per_seed": per_seed,
                     "summary": summary, "seeds": list(study_protocol.seeds),
                     "train_dirs": [r["train_dir"] for r in runs_of[key] if row.trains]}

    def difference(a: str, b: str, metric: statistics.Metric) -> statistics.Difference | None:
        items_a = _items(ROWS[a], runs_of[a], metric)
        items_b = _items(ROWS[b], runs_of[b], metric)
        if items_a is None or items_b is None:
            return None
        return statistics.paired_difference(items_a, items_b, metric,
                                            samples=study_protocol.bootstrap_samples,
                                            rng=np.random.default_rng(0))

    for key in keys:
        rows[key]["paired"] = {
            reference: {metric.key: d.to_dict() for metric in statistics.PAIRED_METRICS
                        if (d := difference(key, reference, metric)) is not None}
            for reference in (rows_lib.CONTROL, rows_lib.DPO) if reference != key}
    claims = []
    for claim in rows_lib.CLAIMS:
        if not set(claim.rows) <= set(keys):
            continue
        comparisons = []
        for better, worse in claim.comparisons:
            metric = statistics.PRIMARY
            found = difference(better, worse, metric)
            if found is None:
                metric = statistics.GREEDY_PRIMARY
                found = difference(better, worse, metric)
            comparisons.append({"better": better, "worse": worse, "metric": metric.key,
                                **found.to_dict()})
        verdict = statistics.claim_verdict([statistics.Difference(
            c["estimate"], c["low"], c["high"], c["verdict"]) for c in comparisons])
        claims.append({"key": claim.key, "title": claim.title, "comparisons": comparisons,
                       "verdict": verdict})
    return {"rows": rows, "claims": claims}


def _base_caption(measured: Mapping[str, list[dict[str, Any]]]) -> str:
    greedy = measured[rows_lib.BASE][0]["evaluation"]["details"].get("greedy") or [{}]
    captions = greedy[0].get("captions") or [""]
    return captions[0]


def run_study(protocol: Any, out: pathlib.Path, cache: pathlib.Path, *, command: str,
              log: Any = print) -> dict[str, Any]:
    """The whole study (module doc) into ``out``: ``EVIDENCE.md``, ``results.json``, the plots.
    Returns the results."""
    started = time.time()
    study = runs.open_study(protocol, cache, log)
    choices, base_validation = select_settings(study)
    measured = measure(study, choices)
    summary = summarise(protocol, measured)
    splits = test_splits(protocol.world)
    caption_records = load_split("shapes_world", splits.caption,
                                 data_dir=os.path.expanduser(protocol.world_config().data.data_dir),
                                 **splits.builder)
    probe = probes.cached(study, caption_records[0], _base_caption(measured))
    plot_names = plots.write(out, summary["rows"], probe)
    results = {
        "command": command, "version": mmpo_jax.__version__, "commit": _commit(),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "wall_s": time.time() - started, "load": _load(),
        "protocol": protocol.to_dict(), "world_spec": study.world_spec,
        "validation_splits": validation_splits(protocol.world).identity(),
        "test_splits": splits.identity(),
        "selection": {key: choice.to_dict() for key, choice in choices.items()},
        "base_validation": base_validation["metrics"],
        "trained_now": len(study.trained_now), "evaluated_now": len(study.evaluated_now),
        "runs_s": sum(study.run_seconds.values()), "runs": len(study.run_seconds),
        "end_window": END_WINDOW,
        **summary, "plots": plot_names,
    }
    report.write(out, results)
    log(f"wrote {out / report.REPORT_FILE} in {results['wall_s'] / 60:.1f} min "
        f"({results['trained_now']} runs trained, {results['evaluated_now']} evaluated now)")
    return results


def _commit() -> str:
    root = pathlib.Path(mmpo_jax.__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" (with uncommitted changes)" if dirty else "")


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"
    except OSError:
        return "unknown"
