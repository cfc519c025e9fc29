"""When to apply the WinQ reset W <- a W + (1 - a) Q(W).

The reference resets every 60k steps (<= 2 bits) or 40k (3-4 bits) at lr 2e-5: at that lr a
weight can move about one step s between two resets, and QAT has long plateaued before the
first one. A fixed period copied as a fraction of a short budget keeps the fraction, not what
the period is for. Three triggers:

    fixed     every `every` optimizer steps (the reference's rule; -1 in TrainConfig = steps // 4)
    travel    when the weights' measured travel since the last reset (winq.diagnostics: mean
              |W - W_reset| over the median step) reaches `travel` steps: a reset every time the
              weights have had room to change codes
    plateau   when the codes have stopped moving: the smoothed per-step flip rate has fallen to
              `flip` x its peak since the last reset (a reset freezes the codes, so the rate first
              has to rise again; if it never does, no further reset comes)

Adaptive triggers never fire before `min_steps` steps since the last reset (or the start),
nor at the final step. The decision is a pure function of the diagnostics, which every DDP
rank computes from the same weights; the trainer also takes rank 0's decision explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TRIGGERS = ("travel", "plateau")
EMA_STEPS = 10  # smoothing of the per-step flip rate for the plateau trigger (time constant, steps)


@dataclass
class ResetSchedule:
    mode: str  # "never" | "fixed" | "travel" | "plateau"
    total_steps: int
    every: int = 0
    travel: float = 1.0
    flip: float = 0.25
    min_steps: int = 10
    last_reset: int = 0  # optimizer step of the last reset (0: the start)
    flip_ema: float = 0.0
    flip_peak: float = 0.0
    history: list = field(default_factory=list)

    @classmethod
    def from_config(cls, tcfg) -> "ResetSchedule":
        if tcfg.method == "qat":
            return cls("never", tcfg.steps)
        if tcfg.reinit_every == "auto":
            return cls(
                tcfg.reinit_trigger,
                tcfg.steps,
                travel=tcfg.reinit_travel,
                flip=tcfg.reinit_flip,
                min_steps=tcfg.reinit_min_steps,
            )
        return cls("fixed", tcfg.steps, every=tcfg.effective_reinit_every)

    @property
    def needs_diagnostics(self) -> bool:
        return self.mode in TRIGGERS

    def observe(self, step: int, diag: dict | None) -> None:
        """Feed the diagnostics measured after optimizer step `step` (before deciding)."""
        if diag is None:
            return
        k = 1.0 / EMA_STEPS
        self.flip_ema = (1 - k) * self.flip_ema + k * diag["flip_rate"]
        self.flip_peak = max(self.flip_peak, self.flip_ema)

    def decide(self, step: int, diag: dict | None) -> str | None:
        """The trigger's name if a reset is due after optimizer step `step`, else None."""
        if self.mode == "never" or step >= self.total_steps:
            return None
        if self.mode == "fixed":
            return "fixed" if step % self.every == 0 else None
        if step - self.last_reset < self.min_steps or diag is None:
            return None
        if self.mode == "travel":
            return "travel" if diag["travel"] >= self.travel else None
        # plateau: the codes moved (peak above one flip per 10M weights per step) and have slowed down
        if self.flip_peak > 1e-7 and self.flip_ema <= self.flip * self.flip_peak:
            return "plateau"
        return None

    def record(self, step: int, trigger: str, diag: dict | None) -> dict:
        """Note a reset at `step`; returns the metrics entry for it."""
        entry = {"step": step, "trigger": trigger, "since_last": step - self.last_reset}
        if diag is not None:
            entry.update({k: diag[k] for k in ("travel", "lr_travel", "flip_rate", "flips_since_reset") if k in diag})
        self.last_reset = step
        self.flip_ema = self.flip_peak = 0.0
        self.history.append(entry)
        return entry

    def state(self) -> dict:
        return {
            "last_reset": self.last_reset,
            "flip_ema": self.flip_ema,
            "flip_peak": self.flip_peak,
            "history": self.history,
        }

    def load_state(self, st: dict) -> None:
        self.last_reset = int(st.get("last_reset", 0))
        self.flip_ema = float(st.get("flip_ema", 0.0))
        self.flip_peak = float(st.get("flip_peak", 0.0))
        self.history = list(st.get("history", []))
