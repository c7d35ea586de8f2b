"""The evidence study: which methods lower hallucination on the embedded world, and by how much.

``python -m mmpo_jax.evidence`` (`__main__`) runs it: every row of `rows` trained from one cached
SFT base at the same budget, its learning rate (and beta) chosen on the validation split
(`selection`), 3 seeds at the chosen settings evaluated on the test splits (`runs`), statistics
over seeds and images (`statistics`), the paper-claim tables, `EVIDENCE.md` + ``results.json``
(`report`) and plots (`plots`, `probes`). `protocol` holds the budgets, grids and splits, `study`
the order of the phases. The package sits at the CLI layer: it imports the training and
evaluation code, never the reverse.
"""
