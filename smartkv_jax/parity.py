"""Run one checkpoint through transformers' PyTorch model and through ours; compare."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .convert import load_model, model_path
from .gguf_metadata import gguf_config_and_tokenizer


def torch_model(name: str):
    """transformers' PyTorch model of a checkpoint named as in `load_model`, in float32."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            "parity needs PyTorch (the test extra): pip install 'smartkv-jax[test]'"
        ) from err
    from transformers import AutoModelForCausalLM

    path = model_path(name)
    if path.suffix == ".gguf":  # transformers dequantizes GGUF weights to float32 itself
        config = gguf_config_and_tokenizer(path)[0]  # its own parse, kept in our cache
        return AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, config=config, dtype=torch.float32
        ).eval()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def run_parity(model: str, text_file: Path, n_tokens: int = 512, greedy_tokens: int = 32) -> dict:
    """Logit agreement on `n_tokens` of text and a greedy-decoding comparison.

    Returns max_abs_logit_diff, top1_agreement (fraction of positions whose argmax agrees)
    and greedy_match (the first `greedy_tokens` greedy tokens after a prompt are identical).
    """
    import jax.numpy as jnp
    import torch

    from .cache import init_cache
    from .generate import generate
    from .policy_table import PolicyConfig

    if not text_file.is_file():
        raise FileNotFoundError(f"text file not found: {text_file}")
    ours = load_model(model, jnp.float32)
    ids = ours.tokenizer(text_file.read_text(encoding="utf-8", errors="replace")).input_ids
    if len(ids) < n_tokens:
        raise ValueError(f"{text_file} has {len(ids)} tokens, fewer than --tokens {n_tokens}")
    ids = ids[:n_tokens]
    ref = torch_model(model)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    policy = PolicyConfig.uniform(ours.cfg.num_layers).resolve(n_tokens, ours.cfg.layer_windows)
    cache = init_cache(ours.cfg, policy, 1)
    pos = jnp.arange(n_tokens, dtype=jnp.int32)[None]
    hidden = ours.model(jnp.asarray([ids]), pos, cache, policy).hidden
    got = np.asarray(ours.model.logits(hidden))[0]

    prompt = ids[: min(128, n_tokens)]
    with torch.no_grad():
        hf_out = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=greedy_tokens,
            min_new_tokens=greedy_tokens,
            do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )[0, len(prompt) :].tolist()
    ours_out = generate(ours.model, [prompt], greedy_tokens, stop_tokens=()).tokens[0]
    return {
        "model": ours.source,
        "tokens": n_tokens,
        "max_abs_logit_diff": float(np.abs(got - want).max()),
        "top1_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1))),
        "greedy_match": hf_out == ours_out,
        "greedy_tokens": greedy_tokens,
    }
