"""A run trained under one placement plan cannot resume under another.

The plan decides which model slot serves each Grouter expert and which samples every rank
trains on, so weights trained under plan A are scrambled under plan B (or under no plan). This
trainer hook stores the plan's fingerprint (None without a plan) in the train state and refuses,
in one line, a checkpoint saved under a different one. The trainer merges `train_state()` into
its own and passes the loaded state to `check_resume()`.
"""

from __future__ import annotations

from megatron_grouter.errors import UserError

STATE_KEY = "placement_plan"


class PlanIdentityHook:
    def __init__(self, plan=None, path: str | None = None):
        self.fingerprint = plan.fingerprint() if plan is not None else None
        self.path = path

    def train_state(self) -> dict:
        return {STATE_KEY: self.fingerprint}

    def check_resume(self, saved_state: dict) -> None:
        saved = saved_state.get(STATE_KEY)
        if saved != self.fingerprint:
            trained = f"plan {saved[:12]}" if saved else "no placement plan"
            now = f"plan {self.path} ({self.fingerprint[:12]})" if self.fingerprint else "no placement plan"
            raise UserError(f"the checkpoint was trained under {trained}, this run uses {now}; resume with "
                            "the run's own router.grouter.plan or start a new train.out_dir")

    def step_metrics(self, trainer) -> dict:
        return {}
