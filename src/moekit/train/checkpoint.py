"""Checkpoints as safetensors files: model weights, optimizer state, RNG states and metadata.

Writes are atomic (a temporary file in the same folder, fsync, then rename), so an interrupted
save never leaves a half-written checkpoint behind. Each tensor's bytes carry a SHA-256 digest in
the file's metadata (key ``moekit.sha256``: a JSON object, tensor name -> hex digest; the header
stays a plain safetensors header that any tool reads), checked on every load, so damage inside
the tensor data is caught instead of resuming into NaN. A missing or corrupt file raises
:class:`CheckpointError` with a one-line message naming it; a checkpoint from before the digests
loads with a warning.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .._io import atomic_write_bytes
from ..layer.experts import LegacyParts, shapes_of, split_legacy_

OPTIM = "optim."
RNG = "rng."
MODEL = "model."
CHECKSUMS = "moekit.sha256"  # metadata key of the per-tensor digests


class CheckpointError(RuntimeError):
    """A checkpoint could not be read (missing, truncated, corrupt, or for another model)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a file system gone read-only): the file it
    would have replaced is intact (atomic writes), and the message says which step it holds."""


def tensor_sha256(t: torch.Tensor) -> str:
    """Hex SHA-256 of a CPU tensor's raw bytes, as safetensors stores them (row-major)."""
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()  # type: ignore[arg-type]  # ndarray is a buffer; numpy's stubs lack __buffer__


def _flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{OPTIM}{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        idx, k = key[len(OPTIM) :].split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: Union[str, Path],
    model: Optional[nn.Module],
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    rng: Optional[dict] = None,
    meta: Optional[dict] = None,
    model_state: Optional[dict] = None,
    optimizer_state: Optional[dict] = None,
) -> None:
    """Save everything needed to continue training exactly. ``model_state`` / ``optimizer_state``
    replace the modules' own state dicts (an expert-parallel run passes the gathered, unsharded
    ones, so the file is the same as a single process would write)."""
    from safetensors.torch import save

    if model_state is None:
        assert model is not None, "save_checkpoint needs model or model_state"
        model_state = model.state_dict()
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    tensors = {MODEL + k: v.detach().cpu().contiguous() for k, v in model_state.items()}
    info = {"meta": meta or {}}
    if optimizer_state is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
        tensors.update(opt_tensors)
        info["optimizer"] = opt_meta
    for name, state in (rng or {}).items():
        tensors[RNG + name] = state.cpu().contiguous()
    digests = {k: tensor_sha256(v) for k, v in tensors.items()}
    data = save(tensors, metadata={"moekit": json.dumps(info), CHECKSUMS: json.dumps(digests)})
    try:
        atomic_write_bytes(path, data)
    except OSError as err:  # the temporary file is removed; the checkpoint it would replace is intact
        step = (meta or {}).get("step")
        raise CheckpointWriteError(
            f"could not write the checkpoint{f' of step {step}' if step is not None else ''} to {path} "
            f"({err.strerror or err}); {_kept_text(Path(path))}"
        ) from None


def _kept_text(path: Path) -> str:
    """What a failed save left at ``path``: the earlier checkpoint (and its step), or nothing."""
    if not path.exists():
        return "no earlier checkpoint was there"
    step = file_step(path)
    return f"the last checkpoint{f' (step {step})' if step is not None else ''} is intact at {path}"


def file_meta(path: Union[str, Path]) -> dict:
    """The ``meta`` a checkpoint file was saved with (step, label, a quantized run's plan, ...), from
    its header only; {} when the file is missing, unreadable or not a checkpoint."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get("moekit", "{}"))
    except Exception:  # noqa: BLE001 - missing, incomplete or corrupt: no meta
        return {}
    meta = info.get("meta", {}) if isinstance(info, dict) else {}
    return meta if isinstance(meta, dict) else {}


def file_step(path: Union[str, Path]) -> Optional[int]:
    """The step in a checkpoint file's metadata (its header only, no tensor read); None when the file
    is missing, unreadable or not a checkpoint."""
    step = file_meta(path).get("step")
    return step if isinstance(step, int) else None


def _warn_unverifiable(path: Path, stacklevel: int) -> None:
    warnings.warn(
        f"moekit: checkpoint {path} has no checksums (written by an older moekit): its tensor data cannot be verified",
        stacklevel=stacklevel + 1,
    )


def read_checkpoint(path: Union[str, Path]) -> tuple[dict, dict]:
    """(tensors, info) of a checkpoint file, every tensor checked against its stored SHA-256;
    CheckpointError if it is missing, unreadable or damaged."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            info = json.loads(meta.get("moekit", "{}"))
            digests = json.loads(meta[CHECKSUMS]) if CHECKSUMS in meta else None
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for broken files
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        ) from err
    if digests is None:
        _warn_unverifiable(path, stacklevel=2)
    else:
        _verify(path, tensors, digests)
    return tensors, info


def _verify(path: Path, tensors: dict, digests) -> None:
    if not isinstance(digests, dict) or set(digests) != set(tensors):
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksum table does not list exactly its tensors")
    for name, t in tensors.items():
        if tensor_sha256(t) != digests[name]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: tensor {name!r} does not match its SHA-256 checksum "
                "(the file was damaged after it was written)"
            )


def read_model_into(
    path: Union[str, Path], model: nn.Module, *, unread_ok: Callable[[str], bool] = lambda name: False
) -> dict:
    """The model's tensors (parameters and persistent buffers) of a single-file checkpoint read into
    their places one at a time, by byte range, each checked against its SHA-256 digest: peak memory
    is the model plus one tensor (the optimizer state is never read). Tensors of the file the model
    lacks are refused unless ``unread_ok(name)`` (the experts an expert store reads later). Returns
    the checkpoint's info (its ``meta``, ...)."""
    from ..store.files import SafetensorsFiles, StoreFileError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        files = SafetensorsFiles([path])
        try:
            _read_model_tensors(path, files, model, unread_ok)
        finally:
            files.close()
    except StoreFileError as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({str(err).splitlines()[0][:200]})") from err
    return json.loads(files.metadata[path].get("moekit", "{}"))


def legacy_parts(model: nn.Module, saved: dict, path: Union[str, Path], optimizer=None) -> LegacyParts:
    """The model's tensors that a checkpoint written before the attention's q/k/v and the dense
    FFNs' gate/up were separate tensors (2026-12-05) holds fused, as each module says
    (``legacy_parts``: :class:`~moekit.models.lm.Attention`, :class:`~moekit.layer.FeedForward`).
    ``saved``: the checkpoint's model names -> shapes. Such a checkpoint loads its weights; its
    optimizer state (``optimizer`` given: a resume) is refused."""
    parts: LegacyParts = {}
    for name, m in model.named_modules():
        if name and hasattr(m, "legacy_parts"):
            parts.update(m.legacy_parts(name + ".", saved))
    if parts and optimizer is not None:
        raise CheckpointError(
            f"checkpoint {path} was written before the attention's q/k/v and the dense FFNs' gate/up "
            "became separate tensors: its weights load, its optimizer state does not resume "
            "(start a new run from it: moekit train --init-from RUN)"
        )
    return parts


def _read_model_tensors(path: Path, files, model: nn.Module, unread_ok: Callable[[str], bool]) -> None:
    meta = files.metadata[path]
    digests = json.loads(meta[CHECKSUMS]) if CHECKSUMS in meta else None
    if digests is None:
        _warn_unverifiable(path, stacklevel=3)
    expected = model.state_dict()
    in_file = {n[len(MODEL) :] for n in files.entries if n.startswith(MODEL)}
    parts = legacy_parts(model, {n: files.entry(MODEL + n).shape for n in in_file}, path)
    fused_names = {old for old, *_ in parts.values()}
    missing = sorted(set(expected) - in_file - set(parts))
    unexpected = sorted(n for n in in_file - set(expected) - fused_names if not unread_ok(n))
    if missing or unexpected:
        what = ([f"missing {', '.join(missing[:6])}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:6])}"] if unexpected else []
        )
        if any(".attn.wqkv.q." in n for n in in_file):  # low-bit tensors of the fused projection
            what.append(
                "a quantized run made before the attention's q/k/v were split (2026-12-05): quantize its "
                "source run again (moekit convert --run SOURCE --quantize ...)"
            )
        raise CheckpointError(f"checkpoint {path} does not fit this model: {'; '.join(what)}")
    fused: dict[str, Tensor] = {}  # an old checkpoint's fused tensors, read once each
    with torch.no_grad():
        for name, t in expected.items():
            if name in parts:
                old, dim, start, length = parts[name]
                if old not in fused:
                    fused[old] = files.read(MODEL + old)
                    if digests is not None and tensor_sha256(fused[old]) != digests.get(MODEL + old):
                        raise CheckpointError(
                            f"checkpoint {path} is corrupt: tensor {MODEL + old!r} does not match its SHA-256 checksum"
                        )
                t.copy_(fused[old].narrow(dim, start, length))
                continue
            key, entry = MODEL + name, files.entry(MODEL + name)
            if entry.shape != tuple(t.shape):
                raise CheckpointError(
                    f"checkpoint {path} does not fit this model: {name!r} has shape {entry.shape} there, "
                    f"{tuple(t.shape)} here"
                )
            direct = entry.dtype == t.dtype and t.is_contiguous() and t.device.type == "cpu"
            raw = t if direct else torch.empty(entry.shape, dtype=entry.dtype)
            files.read_rows(key, raw)
            if digests is not None and tensor_sha256(raw) != digests.get(key):
                raise CheckpointError(
                    f"checkpoint {path} is corrupt: tensor {key!r} does not match its SHA-256 checksum"
                )
            if not direct:
                t.copy_(raw)


def load_checkpoint(
    path: Union[str, Path], model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None, *, parallel=None
) -> tuple[dict, dict]:
    """Load weights (and optimizer state) in place; returns (meta, rng states). ``parallel``: the
    model's :class:`~moekit.parallel.ExpertParallel` handle; each rank keeps its own experts of
    the (always unsharded) file, whatever expert-parallel size wrote it."""
    tensors, info = read_checkpoint(path)
    model_sd = {k[len(MODEL) :]: v for k, v in tensors.items() if k.startswith(MODEL)}
    split_legacy_(model_sd, legacy_parts(model, shapes_of(model_sd), path, optimizer))
    try:
        if parallel is not None:
            parallel.load_full_state_dict(model_sd)
        else:
            model.load_state_dict(model_sd)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {str(err).splitlines()[0][:300]}") from err
    if optimizer is not None:
        if "optimizer" not in info:
            raise CheckpointError(f"checkpoint {path} has no optimizer state to resume from")
        opt_t = {k: v for k, v in tensors.items() if k.startswith(OPTIM)}
        opt_sd = _unflatten_optimizer(opt_t, info["optimizer"])
        if parallel is not None:
            parallel.load_full_optimizer_state_dict(optimizer, opt_sd)
        else:
            optimizer.load_state_dict(opt_sd)
    rng = {k[len(RNG) :]: v for k, v in tensors.items() if k.startswith(RNG)}
    return info.get("meta", {}), rng
