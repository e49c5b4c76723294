"""Logit parity with transformers' PyTorch models on tiny random configs (float32)."""

from __future__ import annotations

import numpy as np
import pytest

from smartkv_jax.config import ModelConfig, UnsupportedArchitectureError
from smartkv_jax.convert import CheckpointError, load_hf_dir

from .conftest import full_logits, tiny_hf_config

torch = pytest.importorskip("torch")

CASES = {
    "llama_gqa_untied": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama3_rope": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "mistral": ("mistral", {"num_key_value_heads": 1}),
    "qwen2_bias": ("qwen2", {"tie_word_embeddings": True}),
}


def _save_random_model(tmp_path, kind, overrides):
    import transformers

    torch.manual_seed(0)
    hf_cfg = tiny_hf_config(kind, **overrides)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg).float().eval()
    with torch.no_grad():  # non-trivial norms and biases so every tensor is exercised
        for name, p in hf_model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path)
    return hf_model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    kind, overrides = CASES[case]
    hf_model = _save_random_model(tmp_path, kind, overrides)
    loaded = load_hf_dir(tmp_path)
    if case == "qwen2_bias":
        assert loaded.cfg.qkv_bias
    if case == "llama3_rope":
        assert loaded.cfg.rope_scaling.kind == "llama3"
    tokens = np.random.default_rng(0).integers(0, 97, size=(2, 48))
    with torch.no_grad():
        want = hf_model(torch.tensor(tokens)).logits.numpy()
    got = full_logits(loaded.model, tokens)
    assert np.abs(got - want).max() <= 1e-4


def test_unsupported_architecture_names_supported_ones():
    import transformers

    cfg = transformers.GPT2Config()
    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, qwen2"):
        ModelConfig.from_hf(cfg)


def test_checkpoint_errors(tmp_path):
    import transformers
    from safetensors.numpy import load_file, save_file

    _save_random_model(tmp_path, "llama", {})
    st = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(st)
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((3, 3), np.float32)
    save_file(tensors, st)
    with pytest.raises(CheckpointError, match="q_proj.weight.*shape"):
        load_hf_dir(tmp_path)
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, st)
    with pytest.raises(CheckpointError, match="no tensor for layers/wq"):
        load_hf_dir(tmp_path)
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, st)
    with pytest.raises(CheckpointError, match="unknown tensor"):
        load_hf_dir(tmp_path)
    st.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_hf_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_dir(tmp_path / "missing")
    del transformers


def test_every_weight_names_known_logical_axes():
    import jax
    from flax import nnx

    from smartkv_jax.model import Transformer
    from smartkv_jax.sharding import LOGICAL_RULES

    from .conftest import tiny_config

    model = Transformer.init_random(tiny_config(qkv_bias=True), jax.random.PRNGKey(0))
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert len(leaves) == 15  # embed, final_norm, lm_head and 12 stacked layer weights
    for v in leaves:
        axes = v.get_metadata("out_sharding")
        assert len(axes) == v[...].ndim and set(axes) <= set(LOGICAL_RULES), axes


def test_regroup_splits_layers_per_cache_group():
    import jax
    import numpy as np

    from smartkv_jax.model import Transformer

    from .conftest import tiny_config

    model = Transformer.init_random(tiny_config(num_layers=3), jax.random.PRNGKey(0))
    grouped = model.regroup(((0, 1), (1, 3)))
    assert [s.wq[...].shape[0] for s in grouped.stacks] == [1, 2]
    np.testing.assert_array_equal(grouped.stacks[1].wq[...][1], model.stacks[0].wq[...][2])
    assert grouped.regroup(((0, 3),)).bounds == ((0, 3),)


def test_group_layers_restacks_in_place_and_lets_the_old_weights_go():
    import gc
    import weakref

    import jax
    import numpy as np

    from smartkv_jax.model import Transformer

    from .conftest import tiny_config

    model = Transformer.init_random(tiny_config(num_layers=4), jax.random.PRNGKey(0))
    want = {n: np.array(w) for n, w in model.stacks[0].weights().items()}  # copies
    old = weakref.ref(model.stacks[0].w_up[...])
    model.group_layers(((0, 1), (1, 3), (3, 4)))
    gc.collect()
    assert old() is None  # no second copy of the weights is held
    assert model.bounds == ((0, 1), (1, 3), (3, 4))
    for name, w in want.items():
        np.testing.assert_array_equal(np.concatenate([s.weights()[name] for s in model.stacks]), w)
    model.group_layers(((0, 2), (2, 4)))  # across the old groups' edges
    np.testing.assert_array_equal(model.stacks[1].wq[...], want["wq"][2:])
    kept = model.stacks[1].wq[...]
    model.group_layers(((0, 2), (2, 4)))  # already so: nothing is copied
    assert model.stacks[1].wq[...] is kept
