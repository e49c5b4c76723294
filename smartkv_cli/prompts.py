"""The prompts of `smartkv generate`: text from --prompt and --prompt-file, turned into token
ids by the model's tokenizer, or read as token ids themselves with --token-ids (the way to
prompt a model without a tokenizer, such as `--model random:NAME`)."""

from __future__ import annotations

import argparse

from smartkv_jax.errors import InputFileError, SmartKVError
from smartkv_jax.input_files import read_text_file

TOKEN_IDS_HINT = "give token ids with --token-ids (each prompt: whitespace-separated ids)"


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompts: each --prompt, then the text of each --prompt-file. SmartKVError when
    there is none; FileNotFoundError or InputFileError naming --prompt-file for a missing,
    unreadable, non-UTF-8 or empty file."""
    if args.chat and args.token_ids:
        raise SmartKVError("--chat wraps text in the chat template: drop --chat or --token-ids")
    prompts = list(args.prompt or [])
    for path in args.prompt_file or []:
        text = read_text_file(path, "--prompt-file", expected="UTF-8 text")
        if not text.strip():
            raise InputFileError(f"--prompt-file {path} is empty")
        prompts.append(text)
    if not prompts:
        raise SmartKVError("no prompt: give --prompt TEXT or --prompt-file FILE")
    return prompts


def prompt_ids(prompts: list[str], m, token_ids: bool) -> list[list[int]]:
    """Each prompt's token ids: by the tokenizer of the loaded model `m`, or with `token_ids`
    the whitespace-separated ids the prompt holds (each checked against the vocabulary)."""
    if not token_ids:
        tokenizer = m.require_tokenizer(TOKEN_IDS_HINT)
        return [tokenizer(p).input_ids for p in prompts]
    return [_parse_ids(p, m.cfg.vocab_size) for p in prompts]


def _parse_ids(prompt: str, vocab_size: int) -> list[int]:
    """The ids of one --token-ids prompt; SmartKVError for a word that is not an id in
    [0, vocab_size)."""
    ids = []
    for word in prompt.split():
        if not word.isdigit() or int(word) >= vocab_size:
            raise SmartKVError(
                f"--token-ids: {word[:20]!r} is not a token id in [0, {vocab_size}) (prompts "
                "hold whitespace-separated ids)"
            )
        ids.append(int(word))
    return ids


def completions(tokens: list[list[int]], m, token_ids: bool) -> list[str]:
    """The generated tokens as text (decoded), or as space-separated ids with `token_ids`."""
    if token_ids:
        return [" ".join(map(str, t)) for t in tokens]
    return [m.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
