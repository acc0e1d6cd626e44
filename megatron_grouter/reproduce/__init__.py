"""mg-reproduce: the paper's experiment at small scale, one command, with a report and plots.

Modules: stages (fingerprint-keyed stage directories), jobs (running a tool in a process or in
this one), routers (target run names → mg-train overrides), pipeline (the stages in order),
stability (routing-stability probe over checkpoints), plan_step (optional EP placement volumes),
metrics (measures from metrics.jsonl), plots and report (report.md with PNG figures), cli.
"""
