"""Every ``<rule>-acc`` a DDOME exploration run reported, per column, on the validation
(``tuning``) and test (``results``) splits: mean over seeds of the mean of the last 5
evaluations. Usage: ``PYTHONPATH=. python docs/img/exploration/s17-rules/read_rules.py FOLDER``."""

import json
import sys

import numpy as np

from benchmarks.matrix import mean_last_cell

runs = json.load(open(f"{sys.argv[1]}/results.json"))
columns = list(dict.fromkeys(r["column"] for r in runs["results"]))
history = runs["results"][0]["history"]
rules = sorted({k[5:-4] for h in history for k in h if k.startswith("test/") and k.endswith("-acc")})
print("rule | validation, per column | mean | test, per column | mean")
for rule in (r for r in rules if r not in ("zero-shot", "common-expert")):
    val = [float(mean_last_cell(runs["tuning"], "ddome", c, f"{rule}-acc")) for c in columns]
    test = [float(mean_last_cell(runs["results"], "ddome", c, f"{rule}-acc")) for c in columns]
    cells = " ".join(f"{x:6.2f}" for x in val), np.mean(val), " ".join(f"{x:6.2f}" for x in test), np.mean(test)
    print(f"{rule:14s} V {cells[0]} | {cells[1]:6.2f}   T {cells[2]} | {cells[3]:6.2f}")
