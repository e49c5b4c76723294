"""The `smartkv` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from smartkv_cli.errors import OneLineParser, add_debug_flag, run_command
from smartkv_cli.flags import add_model_flags, place_model
from smartkv_cli.processes import add_process_flags, start_processes
from smartkv_jax.errors import SmartKVError
from smartkv_jax.jsonio import dumps, write_text_atomic


def cmd_generate(args: argparse.Namespace) -> int:
    from smartkv_cli.prompts import completions, prompt_ids, read_prompts
    from smartkv_jax.convert import DTYPES, load_model
    from smartkv_jax.generate import generate
    from smartkv_jax.policy_table import budget_effective
    from smartkv_jax.sampling import SamplingConfig
    from train.policy_names import check_policy_name

    check_policy_name(args.policy, args.calibrated)
    prompts = read_prompts(args)  # bad prompt files fail before the model loads
    m = load_model(args.model, DTYPES[args.dtype])
    mesh = place_model(m.model, args.mesh)
    if args.chat and not getattr(m.tokenizer, "chat_template", None):
        raise SmartKVError(f"--chat: model {args.model} has no chat template; drop --chat")
    if args.chat:
        prompts = [
            m.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    ids = prompt_ids(prompts, m, args.token_ids)
    sampling = SamplingConfig(
        temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p
    )
    context = max(len(i) for i in ids) + args.max_new_tokens
    policy, gates = _generation_policy(args, m.cfg.num_layers, context)
    kwargs = dict(sampling=sampling, seed=args.seed, chunk=args.chunk, policy=policy, gates=gates)
    res = generate(m.model, ids, args.max_new_tokens, **kwargs)
    texts = completions(res.tokens, m, args.token_ids)
    report = {
        "model": m.source,
        "policy": policy.name,
        "memory_fraction": policy.memory_fraction(context, m.cfg.layer_windows),
        "budget_effective": budget_effective(policy, context, 1, m.cfg.layer_windows),
        "sliding_layers": list(m.cfg.sliding_layers),
        "completions": texts,
        "new_tokens": [len(t) for t in res.tokens],
        "compile_s": round(res.compile_s, 4),
        "prefill_s": round(res.prefill_s, 4),
        "decode_s": round(res.decode_s, 4),
        "decode_tokens_per_s": round(res.decode_tokens_per_s, 2),
        "kv_cache_bytes": res.cache.kv_bytes(),
        "mesh": mesh,
    }
    if args.json:
        print(dumps(report, indent=2))
    else:
        _print_generation(report, policy, prompts, context)
    return 0


def _generation_policy(args: argparse.Namespace, num_layers: int, context: int):
    """(policy, gates) for `generate`; SmartKVError for oracle layers (they read the text's
    future) and for gated layers without --gates."""
    from train.policy_names import parse_policy

    policy = parse_policy(args.policy, num_layers, context, args.budget, args.calibrated)
    if policy.needs_oracle:
        raise SmartKVError(
            f"policy {args.policy!r} has oracle layers, which read the text's future: use them "
            "in `smartkv eval`"
        )
    if not policy.needs_gates:
        return policy, None
    if not args.gates:
        raise SmartKVError(f"policy {args.policy!r} has gated layers: pass --gates CKPT_DIR")
    from smartkv_jax.gate_checkpoint import load_gates

    return policy, load_gates(args.gates)[0]


SHOWN_PROMPT = 200  # characters of a prompt echoed before its completion


def _print_generation(report: dict, policy, prompts: list[str], context: int) -> None:
    print(policy.table() + "\n")
    if not report["budget_effective"] and any(p.kind != "full" for p in policy.layers):
        print(f"note: the budget is not in effect: every layer keeps all {context} tokens\n")
    for p, t in zip(prompts, report["completions"]):
        shown = p if len(p) <= SHOWN_PROMPT else f"{p[:SHOWN_PROMPT]}... ({len(p)} characters)"
        print(f"--- prompt: {shown!r}\n{t}\n")
    print(
        f"compile {report['compile_s']} s, prefill {report['prefill_s']} s, decode "
        f"{report['decode_s']} s: {report['decode_tokens_per_s']} tokens/s (batch "
        f"{len(prompts)}), KV cache {report['kv_cache_bytes'] / 2**20:.1f} MiB"
    )


def cmd_parity(args: argparse.Namespace) -> int:
    from smartkv_jax.parity import run_parity

    report = run_parity(args.model, Path(args.text_file), args.tokens)
    if args.json:
        print(dumps(report, indent=2))
    else:
        for k, v in report.items():
            print(f"{k:>22}: {v}")
    return 0 if report["top1_agreement"] >= 0.99 and report["greedy_match"] else 1


def cmd_labels(args: argparse.Namespace) -> int:
    import jax

    from smartkv_jax.convert import DTYPES, load_model
    from smartkv_jax.data import text_files
    from train.label_store import holds_store
    from train.labels import extract_labels

    start_processes(args)
    text_files(args.text)  # a missing text source or a --out that is no store: before loading
    holds_store(Path(args.out))
    m = load_model(args.model, DTYPES[args.dtype])
    place_model(m.model, args.mesh)
    m.require_tokenizer("labels are taken from text: use a model with tokenizer files")
    meta = extract_labels(
        m.model,
        m.tokenizer,
        args.out,
        model_name=args.model,
        source=args.text,
        books=args.books,
        window=args.window,
        cap=args.cap,
        taus=args.taus,
        windows_per_doc=args.windows_per_doc,
        first_window=args.first_window,
        chunk=args.chunk,
        facts=args.facts,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    if jax.process_index() != 0:
        return 0
    print(
        dumps(meta, indent=2)
        if args.json
        else f"label store {args.out}: {meta['n_windows']} windows of {meta['window']} tokens "
        f"({meta['tokens_per_s']:.0f} tokens/s)"
    )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from train.calibrate import calibrate

    rule = {"discount": None} if args.expiry else {}
    if args.discount is not None and not args.expiry:
        rule["discount"] = args.discount
    table = calibrate(args.labels, args.context, args.budget, tau=args.tau, **rule)
    text = table.to_json()
    if args.out:
        write_text_atomic(args.out, text + "\n")
    print(text if args.json else table.table())
    print(
        f"memory: {table.memory_fraction(args.context):.4f} of the full cache at "
        f"{args.context} tokens",
        file=sys.stderr,
    )
    return 0


def _add_generate(sub) -> None:
    """Adds the `generate` subcommand (text generation with a cache policy) to `sub`."""
    g = sub.add_parser("generate", help="generate text and report decode speed")
    add_model_flags(g)
    g.add_argument(
        "--prompt", action="append", help="prompt text; repeat the flag for a batch of prompts"
    )
    g.add_argument(
        "--prompt-file",
        action="append",
        help="a UTF-8 text file holding one prompt (say a long context); repeatable, read "
        "after the --prompt prompts",
    )
    g.add_argument(
        "--token-ids",
        action="store_true",
        help="prompts hold whitespace-separated token ids, not text, and completions are "
        "printed as ids (models without a tokenizer, such as random:NAME)",
    )
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--greedy", action="store_true", help="argmax decoding (temperature 0)")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--chunk", type=int, default=256, help="prefill chunk length in tokens")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument(
        "--policy",
        default="full",
        help="cache policy: full, hybrid (the seed's per-layer rule), hybrid-calibrated (needs "
        "--calibrated), gated-only, window, recent, h2o, tova, snapkv, knorm, random, or a "
        "JSON policy table file; a ':mask' suffix hides expired slots from attention, "
        "':adaptive' shares gated layers' budgets among KV heads (oneshot compression), "
        "':expiry' ranks gated keys by predicted expiry, ':discount=X' by predicted log4 "
        "life - X * log4(1 + age)",
    )
    g.add_argument(
        "--calibrated",
        default=None,
        help="for hybrid-calibrated: a label store (the table is derived for the context and "
        "--budget, as `smartkv calibrate` does) or a JSON policy table; {mf} in a table's path "
        "is replaced by the budget",
    )
    g.add_argument(
        "--budget",
        type=float,
        default=0.25,
        help="KV memory as a fraction of the full cache (ignored by full / tables)",
    )
    g.add_argument("--gates", default=None, help="gate checkpoint directory (gated policies)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)


def _add_parity(sub) -> None:
    """Adds the `parity` subcommand (logit comparison with PyTorch) to `sub`."""
    p = sub.add_parser("parity", help="compare logits with transformers' PyTorch model")
    add_model_flags(p, dtype=False, mesh=False)
    p.add_argument("--text-file", required=True, help="text to take the tokens from")
    p.add_argument("--tokens", type=int, default=512, help="number of text tokens to compare")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_parity)


def _add_labels(sub) -> None:
    """Adds the `labels` subcommand (lifespan label extraction) to `sub`."""
    lab = sub.add_parser(
        "labels",
        help="extract pre-RoPE keys and lifespan labels into a label store",
        description="Run the model over windows of text and store, for every layer and KV "
        "head, each pre-RoPE key with its lifespan (the last later query whose attention "
        "to it exceeds tau, max over the GQA group) at one or more thresholds. With "
        "--num-processes P, process p labels windows p, p + P, ... and process 0 joins them "
        "into the store (OUT must be on a file system every process sees).",
    )
    add_model_flags(lab)
    lab.add_argument(
        "--text",
        default=None,
        help="directory of .txt files or one file (default: ../shared/data/gutenberg)",
    )
    lab.add_argument(
        "--books",
        nargs="*",
        default=None,
        help="file stems to use from --text, e.g. pg1342 pg1661 (default: all)",
    )
    lab.add_argument("--window", type=int, default=2048, help="tokens per window T")
    lab.add_argument(
        "--cap", type=int, default=1024, help="lifespan cap C; keys after T-1-C are marked censored"
    )
    lab.add_argument(
        "--taus",
        type=float,
        nargs="+",
        default=[0.05, 0.11],
        help="attention thresholds to label at",
    )
    lab.add_argument(
        "--windows-per-doc",
        type=int,
        default=2,
        help="consecutive windows taken from each book",
    )
    lab.add_argument(
        "--first-window",
        type=int,
        default=0,
        help="index of the first window taken from each book (0: the book's start); a store "
        "of windows 12.. and one of windows 0..11 can be trained on together",
    )
    lab.add_argument(
        "--facts",
        type=int,
        default=0,
        help="retrieval facts per window (0: plain text): synthetic facts with 4-8 digit values "
        "are put early in each window and recalled by questions answered at its end, so the "
        "facts' keys get the long lifespans a later question gives them",
    )
    lab.add_argument("--seed", type=int, default=0, help="seed of the facts' text and values")
    lab.add_argument("--chunk", type=int, default=512, help="forward-pass chunk length")
    lab.add_argument(
        "--out",
        required=True,
        help="output directory of the label store; finished windows are kept in OUT.partial/ "
        "until the store is complete, so rerunning an interrupted command resumes it",
    )
    lab.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a label store of another setup at --out (the old store stays until the "
        "new one is complete) and discard unfinished windows of another setup; a store or "
        "unfinished run of the same setup is kept and resumed either way",
    )
    lab.add_argument("--json", action="store_true", help="print the store's metadata as JSON")
    add_process_flags(lab)
    lab.set_defaults(func=cmd_labels)


def _add_calibrate(sub) -> None:
    """Adds the `calibrate` subcommand (hybrid policy table from labels) to `sub`."""
    cal = sub.add_parser(
        "calibrate",
        help="derive a hybrid per-layer policy table from label statistics",
        description="Classify each layer from its lifespan statistics (95%% of keys live <= 16 "
        "tokens: a 32-token window + 4 sinks; under 1%% of keys live >= 64 tokens: recent "
        "only; otherwise gated) and split the memory budget between the other layers by "
        "their expected number of live keys (Little's law) blended with equal shares.",
    )
    cal.add_argument("--labels", required=True, help="label store written by `smartkv labels`")
    cal.add_argument("--context", type=int, default=8192, help="context length the budget is for")
    cal.add_argument(
        "--budget",
        type=float,
        default=0.25,
        help="KV memory as a fraction of the full cache at --context",
    )
    cal.add_argument("--tau", type=float, default=0.05, help="threshold of the labels to use")
    cal.add_argument(
        "--discount",
        type=float,
        default=None,
        help="gated layers rank keys by predicted log4 life - DISCOUNT * log4(1 + age) "
        "(default: train.calibrate.DISCOUNT, 0.5)",
    )
    cal.add_argument(
        "--expiry",
        action="store_true",
        help="rank gated keys by predicted expiry pos + 2 * 4**prediction instead (better "
        "perplexity, loses details that only a late question reads)",
    )
    cal.add_argument("--out", default=None, help="write the table as JSON here")
    cal.add_argument("--json", action="store_true", help="print the table as JSON")
    cal.set_defaults(func=cmd_calibrate)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="smartkv", description="SmartKV-JAX: learned KV-cache eviction for decoder LLMs."
    )
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_parity(sub)
    _add_labels(sub)
    _add_calibrate(sub)

    from eval.analyze import add_cli as add_analyze_cli
    from smartkv_cli.eval import add_eval_cli
    from smartkv_cli.train_gates import add_cli as add_train_cli

    add_train_cli(sub)
    add_analyze_cli(sub)
    add_eval_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `smartkv` on `argv` (default: sys.argv[1:]); the exit status (smartkv_cli/errors.py:
    0 done, 1 internal error, 2 bad input, 130 interrupted)."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
