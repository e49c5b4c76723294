"""The layer rule (docs/design.md): every module imports only its own layer or lower ones,
function-level imports included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("pallas_kernels", "smartkv_jax", "train", "eval", "smartkv_cli")  # lowest first


def _imported_packages(path: Path) -> set[str]:
    """Top-level package of every absolute import in a file (relative ones stay inside)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def layer_violations(root: Path = ROOT) -> list[str]:
    """ "file imports package" for every import that runs up a layer."""
    bad = []
    for rank, layer in enumerate(LAYERS):
        for path in sorted((root / layer).rglob("*.py")):
            for pkg in sorted(_imported_packages(path) & set(LAYERS)):
                if LAYERS.index(pkg) > rank:
                    bad.append(f"{path.relative_to(root)} imports {pkg}")
    return bad


def test_no_module_imports_a_higher_layer():
    assert layer_violations() == []


def test_the_rule_catches_an_upward_import(tmp_path):
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "smartkv_jax" / "ok.py").write_text("import pallas_kernels.lifespan\n")
    (tmp_path / "train" / "bad.py").write_text("def f():\n    from eval.needle import x\n")
    assert layer_violations(tmp_path) == ["train/bad.py imports eval"]
