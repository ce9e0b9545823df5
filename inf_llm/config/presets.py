"""The YAML presets shipped in `config/` (installed as the package data folder `inf_llm/presets/`), and the one
chosen for a model when none is given."""

from __future__ import annotations

import logging
from pathlib import Path

from inf_llm.config.schema import ConfigError, suggest

logger = logging.getLogger(__name__)


def _preset_dir() -> Path:
    """Where the YAML presets are: the package data folder `inf_llm/presets/` of an installed copy (setup.py maps
    `config/` there), else `config/` at the root of the source tree this module runs from (an editable install, or
    `python -m` in a checkout)."""
    here = Path(__file__).resolve().parent.parent  # inf_llm/
    installed = here / "presets"
    return installed if installed.is_dir() else here.parent / "config"


PRESET_DIR = _preset_dir()
EMBEDDED_MODEL_PRESET = "smollm2-inf-llm"


def available_presets() -> tuple[str, ...]:
    """Names of the presets in `PRESET_DIR` (file names without `.yaml`)."""
    return tuple(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))


def preset_path(name: str) -> Path:
    """The file of preset `name` (with or without `.yaml`)."""
    stem = name.removesuffix(".yaml")
    path = PRESET_DIR / f"{stem}.yaml"
    if Path(stem).name != stem or not path.is_file():
        names = available_presets()
        raise ConfigError(f"no preset named {name!r} in {PRESET_DIR}{suggest(stem, names)} "
                          f"(available: {', '.join(names)})")
    return path


# Checkpoint `model_type` -> preset tuned for that family (the paper's settings for 7-8B instruct models).
_PRESET_FOR_MODEL_TYPE = {"mistral": "mistral-7b-instruct-inf-llm", "llama": "llama-3-8b-instruct-inf-llm",
                          "qwen2": "qwen2.5-7b-instruct-inf-llm"}


def default_preset_for(model_type: str | None) -> Path:
    """The preset to use when none is given: None means the embedded model.

    A family without a preset gets the embedded model's, and that is logged.
    """
    if model_type is None:
        return preset_path(EMBEDDED_MODEL_PRESET)
    name = _PRESET_FOR_MODEL_TYPE.get(model_type)
    if name is None:
        logger.info("no preset for model type %r; using %s", model_type, EMBEDDED_MODEL_PRESET)
        name = EMBEDDED_MODEL_PRESET
    return preset_path(name)
