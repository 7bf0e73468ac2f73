"""A run folder's layout and its run-level files: the config, the tokenizer, the comparison and
the sub-runs (one per trained model). ``train`` writes them; ``train``, ``generate`` and
``analysis`` read them from here.

A sub-run folder's own files (checkpoint, metrics, summary) belong to :mod:`moekit.train.trainer`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from ._io import atomic_write_bytes, read_json
from .config import LMConfig, TrainConfig

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
COMPARISON = "comparison.json"


def save_run_config(
    run_dir: Path,
    model_cfg: LMConfig,
    train_cfg: TrainConfig,
    *,
    baseline: bool,
    dense_only: bool,
    init_from: Optional[str] = None,
) -> None:
    cfg = {
        "model": model_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "baseline": baseline,
        "dense_only": dense_only,
        "init_from": init_from,
    }
    atomic_write_bytes(run_dir / CONFIG, json.dumps(cfg, indent=2).encode())


def load_run_config(run_dir: Union[str, Path]) -> tuple[LMConfig, TrainConfig, dict]:
    """(model config, train config, the raw dict) of a run folder."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a moekit run folder (no {CONFIG})")
    raw = read_json(path)  # ValueError naming the file when it is not JSON
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict) or not isinstance(raw.get("train"), dict):
        raise ValueError(f"{path} is not a valid run config: expected an object with 'model' and 'train' objects")
    try:
        return LMConfig.from_dict(raw["model"]), TrainConfig.from_dict(raw["train"]), raw
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid run config: {err}") from None


def read_run_json(path: Union[str, Path], what: str) -> dict:
    """A JSON object of a run folder (``what``: e.g. "summary"), read with :func:`moekit._io.read_json`
    (errors name the file); ValueError naming the file when it holds something else than an object."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a valid {what}: expected a JSON object, got {type(obj).__name__}")
    return obj


def sub_runs(raw: dict, model_cfg: LMConfig) -> list[tuple[str, LMConfig]]:
    """(label, model config) of each model the run trains, in order."""
    if raw.get("dense_only") or model_cfg.moe is None:  # a config without MoE layers is the dense model
        return [("dense", model_cfg.dense_twin())]
    runs = [("moe", model_cfg)]
    if raw.get("baseline", True) and model_cfg.moe is not None:
        runs.append(("dense", model_cfg.dense_twin()))
    return runs
