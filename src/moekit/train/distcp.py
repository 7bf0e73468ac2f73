"""Sharded checkpoints of runs on several processes, with ``torch.distributed.checkpoint`` (DCP).

Under torchrun every rank writes its own part: the model's parameters and their AdamW moments are
DTensors (FSDP shards over all ranks; experts sharded on the expert dimension over ``ep``, then
over ``dp``), each part written by the rank holding it; replicated tensors (buffers, a plain
data-parallel model's parameters) are written once, each by the rank that has written the fewest
bytes so far. The folder
reloads on any layout: another expert-parallel size, data parallel only, or one process (no
process group: every tensor is assembled from its chunks), since DCP reshards on load.

A checkpoint folder (``checkpoint.dcp`` next to the one-process ``checkpoint.safetensors``)::

    .metadata        DCP's index: every tensor's global shape and dtype, its chunks and where they lie
    __R_0.distcp     what rank R wrote
    moekit.json      written last, by rank 0: meta (step, label, ...), the optimizer's parameter
                     groups by parameter name, the SHA-256 of every stored item and the size of
                     every file (the checkpoint is complete only once this file exists)

State-dict keys: ``model.<name>`` (the model's state dict, full shapes), ``optim.<name>.<key>``
(the optimizer state of parameter ``<name>``: keyed by name, not by index, so it loads whatever
the optimizer's layout), ``rng.<name>`` (rank 0's random-number-generator states). Routing
statistics kept per rank (``statistics="expert"`` or ``"local"``: each rank's ``expert_usage``
and ``steps_unused``) are saved as ``(world, ...)`` tensors, one row per rank, named in the
manifest's ``per_rank``: a load on the same number of ranks gives each rank its own row; on
another number, or in one process, rank r takes row ``r mod world`` (one process: rank 0's).

Atomic: the ranks write into ``checkpoint.dcp.tmp``; once every rank is done and ``moekit.json``
is written, rank 0 swaps it in (``checkpoint.dcp`` -> ``checkpoint.dcp.old``, ``.tmp`` ->
``checkpoint.dcp``, then deletes ``.old``). A crash at any point leaves a complete checkpoint
that :func:`resolve` finds (the complete ``.tmp`` when the crash fell between the two renames,
``.old`` when no other is left) and :func:`repair` puts back in place.

Verified: loading first checks, on every rank and without communicating, that ``moekit.json`` and
``.metadata`` are there and intact, that every file has the size written, and that the checkpoint
holds this model's tensors with their shapes; then the ranks share the work of checking the
SHA-256 of every item they are about to read and agree on the outcome (one gather). Any failure is
a :class:`CheckpointError` naming the folder, raised on every rank before DCP's own collectives.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional, TypeGuard, Union

import torch
from torch import Tensor, nn

from .._io import atomic_write_text
from .checkpoint import MODEL, OPTIM, RNG, CheckpointError, legacy_parts, read_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

DCP_DIR = "checkpoint.dcp"
MANIFEST = "moekit.json"
METADATA = ".metadata"  # DCP's own index file
FORMAT = "moekit.dcp"
VERSION = 1
# the routing statistics a rank keeps for itself when statistics are not global (see
# moekit.parallel.apply_expert_parallel): saved as one row per rank, not as replicated tensors
PER_RANK = ("expert_usage", "steps_unused")
_TMP, _OLD = ".tmp", ".old"
_CHUNK = 1 << 22  # bytes read at a time while hashing


# ---------------------------------------------------------------------------------------------- places
def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + _TMP)


def old_path(path: Path) -> Path:
    return path.with_name(path.name + _OLD)


def is_complete(path: Path) -> bool:
    """A DCP checkpoint folder whose save finished (its manifest is written last)."""
    return (path / MANIFEST).is_file()


def resolve(path: Union[str, Path]) -> Optional[Path]:
    """The complete checkpoint folder to read for ``path`` (``.../checkpoint.dcp``), or None.

    ``path`` itself when it exists; else the finished temporary folder (a save that crashed
    between its two renames) or the previous checkpoint (``.old``). Reads only: :func:`repair`
    renames."""
    path = Path(path)
    if path.is_dir():
        return path
    if is_complete(tmp_path(path)):
        return tmp_path(path)
    if old_path(path).is_dir():
        return old_path(path)
    return None


def repair(path: Union[str, Path]) -> None:
    """Put the checkpoint a crashed save left back in place and delete the leftovers (call it on
    one process, while no other writes the folder)."""
    path = Path(path)
    tmp, old = tmp_path(path), old_path(path)
    if not path.exists():
        found = resolve(path)
        if found is not None:
            os.replace(found, path)
            _fsync_dir(path.parent)
    for leftover in (tmp, old):
        if leftover.exists():  # the manifest first: a removal cut short leaves no complete-looking folder
            (leftover / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(leftover, ignore_errors=True)


def remove(path: Union[str, Path]) -> None:
    """Delete a DCP checkpoint (and its temporaries): its manifest first, so an interrupted
    removal leaves a folder that no longer counts as a checkpoint."""
    path = Path(path)
    for p in (path, tmp_path(path), old_path(path)):
        if p.exists():
            (p / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(p, ignore_errors=True)


def read_manifest(path: Union[str, Path]) -> dict:
    """The ``moekit.json`` of a checkpoint folder; CheckpointError if missing or unreadable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}")
    f = path / MANIFEST
    if not f.is_file():
        why = "the save did not finish" if (path / METADATA).exists() or any(path.glob("*.distcp")) else "it is empty"
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST} ({why})")
    try:
        manifest = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} is not readable JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is not a moekit distributed checkpoint ({MANIFEST} has no format {FORMAT!r})"
        )
    if manifest.get("version", 0) > VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {manifest['version']}; this moekit reads up to "
            f"{VERSION} (upgrade moekit)"
        )
    for key in ("meta", "items", "files", "metadata_sha256"):
        if key not in manifest:
            raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} has no {key!r}")
    return manifest


# ---------------------------------------------------------------------------------------------- helpers
def _sha256_range(file: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            block = f.read(min(_CHUNK, left))
            if not block:
                break  # a short file: the digest will not match
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _item_key(index) -> str:
    """A stable text key for a DCP storage item (a tensor chunk: name and offsets; or a blob)."""
    return index.fqn if index.offset is None else f"{index.fqn}@{','.join(map(str, index.offset))}"


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__


def _group(par):
    """The process group of ``par``'s ranks (its mesh's: a pipeline stage's model saves with its
    stage alone), or the default group for a handle without one."""
    return getattr(par, "group", None)


def _partial(par) -> bool:
    """Whether each rank of ``par`` holds only part of the model (a pipeline stage: its own
    parameters, the checkpoint the union of the stages')."""
    return bool(getattr(par, "partial_model", False))


def _merged_optimizer(par, opt_json: Optional[dict]) -> Optional[dict]:
    """Every stage's optimizer groups as one optimizer's: group ``i`` lists the parameters of every
    stage's group ``i`` in stage order (the one-process parameter order), scalars joined."""
    from ..parallel.collectives import all_gather_objects

    parts = all_gather_objects("checkpoint optimizer groups", opt_json, _group(par))
    if any(p is None for p in parts):
        return None
    groups = [dict(g, params=[]) for g in parts[0]["param_groups"]]
    scalars: dict = {}
    for part in parts:
        if len(part["param_groups"]) != len(groups):
            raise CheckpointError("the stages' optimizers have different numbers of parameter groups")
        for merged, g in zip(groups, part["param_groups"]):
            merged["params"] += [n for n in g["params"] if n not in merged["params"]]  # a tied weight: once
        scalars.update(part["scalars"])
    return {"param_groups": groups, "scalars": scalars}


def _rank_world(par) -> tuple[int, int]:
    """This rank's place and the number of ranks among ``par``'s (0, 1 with no process group)."""
    if par is None:
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(_group(par)), dist.get_world_size(_group(par))


def _agree(par, error: Optional[str]) -> None:
    """Raise CheckpointError on every rank of ``par`` when any has an error (one gather); with one
    process, raise it directly."""
    if par is not None:
        from ..parallel.collectives import all_gather_objects

        errors = all_gather_objects("checkpoint check", error, _group(par))
        error = next((e for e in errors if e), None)
    if error:
        raise CheckpointError(error)


def _is_dtensor(t) -> TypeGuard[DTensor]:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _param_names(model: nn.Module, optimizer) -> list[list[str]]:
    """The names of the optimizer's parameters, group by group."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in optimizer.param_groups:
        missing = [i for i, p in enumerate(g["params"]) if id(p) not in names]
        if missing:
            raise ValueError(f"the optimizer holds {len(missing)} tensor(s) that are not parameters of the model")
        out.append([names[id(p)] for p in g["params"]])
    return out


# ---------------------------------------------------------------------------------------------- save
def _balanced_planner():
    """DCP's default save planner, but replicated tensors go to the ranks so that every rank
    writes about as many bytes: each rank's own items (its expert shards) are counted first, then
    the replicated ones, largest first, each to the least loaded rank that holds it (DCP's own
    rule assigns them in state-dict order before it sees the later ranks' own items)."""
    import dataclasses

    from torch.distributed.checkpoint import DefaultSavePlanner

    class BalancedSavePlanner(DefaultSavePlanner):
        def _dedup_save_plans(self, all_plans):
            holders: dict = {}
            items: dict = {}
            for r, plan in enumerate(all_plans):
                for item in plan.items:
                    holders.setdefault(item.index, []).append(r)
                    items[item.index] = item
            size = [0] * len(all_plans)
            keep: dict = {}
            for index, ranks in holders.items():
                if len(ranks) == 1:
                    keep[index] = ranks[0]
                    size[ranks[0]] += items[index].tensor_storage_size() or 1
            shared = sorted(
                (i for i, rs in holders.items() if len(rs) > 1),
                key=lambda i: (-(items[i].tensor_storage_size() or 1), _item_key(i)),
            )
            for index in shared:
                r = min(holders[index], key=lambda q: (size[q], q))
                keep[index] = r
                size[r] += items[index].tensor_storage_size() or 1
            return [
                dataclasses.replace(plan, items=[it for it in plan.items if keep[it.index] == r])
                for r, plan in enumerate(all_plans)
            ]

    return BalancedSavePlanner()


def _per_rank_mode(par) -> bool:
    """Whether ``par`` keeps routing statistics per rank (not global) on a mesh of all ranks."""
    return (
        par is not None and getattr(par, "statistics", "global") != "global" and getattr(par, "mesh", None) is not None
    )


def _per_rank_keys(model_sd: dict, par) -> list[str]:
    """The model's statistics buffers that differ between ranks under ``par`` (none when global)."""
    return [k for k in model_sd if k.rsplit(".", 1)[-1] in PER_RANK] if _per_rank_mode(par) else []


def _rows_of_ranks(local: Tensor, mesh) -> DTensor:
    """``local`` of every rank as the rows of one ``(world, ...)`` DTensor (row = the rank's
    place in ``mesh``, which spans all ranks)."""
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(local.unsqueeze(0), mesh, [Shard(0)] * mesh.ndim, run_check=False)


def _save_state(model: nn.Module, optimizer, par, rng: Optional[dict]) -> tuple[dict, Optional[dict]]:
    """(the state dict DCP writes, the optimizer's JSON part)."""
    model_sd = model.state_dict()
    state = {MODEL + k: v for k, v in model_sd.items()}
    for k in _per_rank_keys(model_sd, par):
        state[MODEL + k] = _rows_of_ranks(model_sd[k].detach(), par.mesh)
    opt_json = None
    if optimizer is not None:
        groups, scalars = [], {}
        for g, names in zip(optimizer.param_groups, _param_names(model, optimizer)):
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": names})
            for p, name in zip(g["params"], names):
                for k, v in optimizer.state.get(p, {}).items():
                    if torch.is_tensor(v):
                        state[f"{OPTIM}{name}.{k}"] = v
                    else:
                        scalars[f"{name}.{k}"] = v
        opt_json = {"param_groups": groups, "scalars": scalars}
    for k, v in (rng or {}).items():
        state[RNG + k] = v.cpu()
    return state, opt_json


def save_distributed(
    path: Union[str, Path],
    model: nn.Module,
    optimizer=None,
    par=None,
    *,
    rng: Optional[dict] = None,
    meta: Optional[dict] = None,
) -> None:
    """Write a DCP checkpoint folder at ``path`` (collective: call on every rank of ``par``'s
    mesh, which may be some of the ranks: e.g. one pipeline stage's, the others saving their own).

    ``par``: the model's :class:`~moekit.parallel.ExpertParallel` handle (None: one process,
    e.g. a conversion); the model's DTensor parameters are saved as the shards each rank holds.
    ``rng``: rank 0's generator states (the other ranks' are ignored). ``meta``: a
    JSON-able dict stored in ``moekit.json``. Atomic (see the module docstring)."""
    path = Path(path)
    tmp = tmp_path(path)
    rank, world = _rank_world(par)
    error = None
    if rank == 0:
        try:
            repair(path)  # a crashed save's complete checkpoint back in place, its leftovers deleted
            tmp.mkdir(parents=True)
        except OSError as err:
            error = f"cannot write the checkpoint {path}: {_one_line(err)}"
    _agree(par, error)  # also: nobody writes into tmp before rank 0 has emptied it
    state, opt_json = _save_state(model, optimizer, par, rng if rank == 0 else None)
    if _partial(par):
        opt_json = _merged_optimizer(par, opt_json)
    per_rank = _per_rank_keys(model.state_dict(), par)
    md = _write_parts(path, state, par, rank)
    parts = _gather_digests(par, _own_digests(path, md, rank), world)
    error = next((p[2] for p in parts if p[2]), None)
    if rank == 0 and error is None:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "meta": meta or {},
            "world_size": world,
            "expert_parallel": getattr(par, "ep_size", 1),
            "tensor_parallel": getattr(par, "tp_size", 1),
            "optimizer": opt_json,
            "per_rank": per_rank,
        }
        error = _publish(path, manifest, parts)
    _agree(par, error if rank == 0 else None)


def _write_parts(path: Path, state: dict, par, rank: int):
    """DCP's save of this rank's part into ``path``'s temporary folder; returns DCP's metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    try:
        writer = FileSystemWriter(
            str(tmp_path(path)), single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=True
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            return dcp.save(
                state,
                storage_writer=writer,
                planner=_balanced_planner(),
                process_group=_group(par),
                no_dist=par is None,
            )
    except Exception as err:  # noqa: BLE001 - DCP raises CheckpointException on every rank when one fails
        raise CheckpointError(f"writing the checkpoint {path} failed on rank {rank}: {_one_line(err)}") from err


def _own_digests(path: Path, md, rank: int) -> tuple[dict, dict, Optional[str]]:
    """(place and SHA-256 of every item this rank wrote, its files' sizes, error): hashed while
    the bytes are still in the page cache."""
    tmp, mine, files = tmp_path(path), {}, {}
    try:
        prefix = f"__{rank}_"
        for index, info in md.storage_data.items():
            if info.relative_path.startswith(prefix):
                mine[_item_key(index)] = {
                    "file": info.relative_path,
                    "offset": info.offset,
                    "length": info.length,
                    "sha256": _sha256_range(tmp / info.relative_path, info.offset, info.length),
                }
        files = {p.name: p.stat().st_size for p in tmp.glob(prefix + "*.distcp")}
    except OSError as err:
        return mine, files, f"checkpoint {path}: rank {rank} cannot read back what it wrote ({_one_line(err)})"
    return mine, files, None


def _gather_digests(par, own: tuple, world: int) -> list:
    """Every rank's :func:`_own_digests` (one process: its own)."""
    if par is None:
        return [own]
    from ..parallel.collectives import all_gather_objects

    return all_gather_objects("checkpoint digests gather", own, _group(par))


def _publish(path: Path, manifest: dict, parts: list) -> Optional[str]:
    """Rank 0, once every rank has written: the manifest into the temporary folder, then the swap
    (at every instant one complete checkpoint exists, see :func:`resolve`). Returns an error."""
    tmp, old = tmp_path(path), old_path(path)
    try:
        items, all_files = {}, {}
        for m, f, _ in parts:
            items.update(m)
            all_files.update(f)
        manifest = {
            **manifest,
            "metadata_sha256": _sha256_range(tmp / METADATA, 0, (tmp / METADATA).stat().st_size),
            "files": dict(sorted(all_files.items())),
            "items": dict(sorted(items.items())),
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except (OSError, TypeError, ValueError) as err:
        return f"writing the checkpoint {path} failed on rank 0: {_one_line(err)}"
    return None


# ---------------------------------------------------------------------------------------------- checks
def _read_metadata(path: Path, manifest: dict):
    """DCP's index of ``path``, checked against the manifest's digest and file sizes."""
    md_file = path / METADATA
    if not md_file.is_file():
        raise CheckpointError(f"checkpoint {path} is corrupt: its index {METADATA} is missing")
    if _sha256_range(md_file, 0, md_file.stat().st_size) != manifest["metadata_sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its index {METADATA} does not match its SHA-256 checksum")
    for name, size in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(
                f"checkpoint {path} is missing the shard file {name} (written by rank "
                f"{name[2:].split('_')[0]}; copy the whole folder)"
            )
        if f.stat().st_size != size:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: the shard file {name} has {f.stat().st_size} bytes, "
                f"{size} were written (truncated or damaged)"
            )
    try:
        with open(md_file, "rb") as f:
            md = pickle.load(f)
        storage = md.storage_data
        tensors = md.state_dict_metadata
    except Exception as err:  # noqa: BLE001 - unpickling a damaged file raises anything
        raise CheckpointError(f"checkpoint {path} is corrupt: {METADATA} is not readable ({_one_line(err)})") from err
    for index, info in storage.items():
        key = _item_key(index)
        item = manifest["items"].get(key)
        if item is None or (item["file"], item["offset"], item["length"]) != (
            info.relative_path,
            info.offset,
            info.length,
        ):
            raise CheckpointError(f"checkpoint {path} is corrupt: {MANIFEST} and {METADATA} disagree about {key!r}")
    return md, tensors


def _check_model(path: Path, tensors: dict, expected: dict, per_rank: tuple = (), part: bool = False) -> None:
    """CheckpointError unless the checkpoint holds exactly ``expected`` (name -> global shape) under
    ``model.`` (a ``per_rank`` name: one row of that shape per saving rank); ``part``: at least
    ``expected`` (a pipeline stage's part of the model)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {
        k[len(MODEL) :]: tuple(v.size)[1:] if k[len(MODEL) :] in per_rank else tuple(v.size)
        for k, v in tensors.items()
        if k.startswith(MODEL) and isinstance(v, TensorStorageMetadata)
    }
    missing = [k for k in expected if k not in saved]
    extra = [] if part else [k for k in saved if k not in expected]
    shapes = [
        f"{k} is {saved[k]} in the checkpoint, {expected[k]} in the model"
        for k in expected
        if k in saved and saved[k] != tuple(expected[k])
    ]
    if missing or extra or shapes:

        def few(names):
            return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

        parts = (
            ([f"missing {few(missing)}"] if missing else [])
            + ([f"unexpected {few(extra)}"] if extra else [])
            + shapes[:2]
        )
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (another model's checkpoint?): {'; '.join(parts)}"
        )


def _verify_items(path: Path, manifest: dict, md, keys: set, rank: int, world: int) -> Optional[str]:
    """Check this rank's share of the SHA-256 digests of the items that hold ``keys``."""
    items = sorted((_item_key(i), info) for i, info in md.storage_data.items() if i.fqn in keys)
    load = [0] * world
    for key, info in items:  # share the bytes: each item to the rank with the least so far
        r = min(range(world), key=lambda i: load[i])
        load[r] += info.length
        if r != rank:
            continue
        if _sha256_range(path / info.relative_path, info.offset, info.length) != manifest["items"][key]["sha256"]:
            return (
                f"checkpoint {path} is corrupt: {key.split('@')[0]!r} in {info.relative_path} does not match its "
                f"SHA-256 checksum (the file was damaged after it was written)"
            )
    return None


# ---------------------------------------------------------------------------------------------- load
def load_distributed(
    path: Union[str, Path], model: nn.Module, optimizer=None, par=None, *, rng: bool = True
) -> tuple[dict, dict]:
    """Load a DCP checkpoint folder into ``model`` (and ``optimizer``) in place, resharding to this
    layout; returns (meta, rng states). Collective when ``par`` is given (every rank of its mesh calls it);
    with ``par=None`` one process reads it without a process group, into full tensors.

    Only the items asked for are read (``optimizer=None, rng=False``: the model's tensors only),
    one at a time, into the model's own tensors. Every failure is a CheckpointError naming the
    folder, raised on every rank before DCP's collectives start."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    path = Path(path)
    rank, world = _rank_world(par)
    error, manifest, md, state = None, None, None, None
    rows: dict = {}
    legacy: dict = {}
    try:  # the same checks on every rank, from the files alone
        manifest = read_manifest(path)
        md, tensors = _read_metadata(path, manifest)
        model_sd = model.state_dict()
        per_rank = tuple(manifest.get("per_rank", ()))
        shapes = {k: tuple(v.shape) for k, v in model_sd.items()}  # a DTensor's shape is global
        saved = {
            k[len(MODEL) :]: tuple(v.size) for k, v in tensors.items() if k.startswith(MODEL) and hasattr(v, "size")
        }
        legacy = legacy_parts(model, saved, path, optimizer)
        for name, (old, *_) in legacy.items():  # check and read the fused tensors in their place
            shapes.pop(name)
            shapes[old] = tuple(tensors[MODEL + old].size)
        _check_model(path, tensors, shapes, per_rank, part=_partial(par))
        state = {MODEL + k: v for k, v in model_sd.items() if k not in legacy}
        for old in {old for old, *_ in legacy.values()}:  # whole on every rank (the small dense maps)
            item = tensors[MODEL + old]
            state[MODEL + old] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
        rows = {k: _row_target(model_sd[k], tensors[MODEL + k], par, world) for k in per_rank}
        state.update({MODEL + k: t for k, t in rows.items()})
        opt_plan = None
        if optimizer is not None:
            opt_plan = _optimizer_targets(path, manifest, tensors, model, optimizer, par, state)
        if rng:
            for k, v in tensors.items():
                if k.startswith(RNG):
                    state[k] = torch.empty(tuple(v.size), dtype=v.properties.dtype)
        error = _verify_items(path, manifest, md, set(state), rank, world)
    except CheckpointError as err:
        error = str(err)
    except Exception as err:  # noqa: BLE001 - anything else must not leave the other ranks waiting
        error = f"checkpoint {path} could not be read on rank {rank}: {_one_line(err)}"
    _agree(par, error)
    assert manifest is not None and state is not None  # else _agree raised the error
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            reader = FileSystemReader(str(path))
            dcp.load(state, storage_reader=reader, process_group=_group(par), no_dist=par is None)
    except Exception as err:  # noqa: BLE001 - DCP raises CheckpointException on every rank when one fails
        raise CheckpointError(f"reading the checkpoint {path} failed on rank {rank}: {_one_line(err)}") from err
    for k, t in rows.items():  # each rank's own row (or rank r's: r mod the saving world)
        model_sd[k].copy_(t.to_local()[0] if _is_dtensor(t) else t[rank % t.shape[0]])
    for name, (old, dim, start, length) in legacy.items():
        _copy_whole_into(model_sd[name], state[MODEL + old].narrow(dim, start, length))
    if optimizer is not None:
        assert opt_plan is not None
        _load_optimizer(path, optimizer, manifest, state, opt_plan)
    rng_states = {k[len(RNG) :]: v for k, v in state.items() if k.startswith(RNG)}
    return manifest["meta"], rng_states


@torch.no_grad()
def _copy_whole_into(dst: Tensor, whole: Tensor) -> None:
    """``whole`` (the full tensor) into ``dst``: a DTensor keeps its own part of it (PyTorch's
    ``distribute_tensor`` from this rank's copy, no communication)."""
    if _is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor

        dst.to_local().copy_(distribute_tensor(whole, dst.device_mesh, dst.placements, src_data_rank=None).to_local())
    else:
        dst.copy_(whole)


def _row_target(buf: Tensor, saved, par, world: int):
    """Where a per-rank item is read: this rank's row as a DTensor when the checkpoint was saved by
    as many ranks in per-rank mode; else the whole ``(saved world, ...)`` tensor."""
    shape = tuple(saved.size)
    if shape[0] == world and _per_rank_mode(par):
        return _rows_of_ranks(torch.empty_like(buf), par.mesh)
    return torch.empty(shape, dtype=saved.properties.dtype)


def _optimizer_targets(
    path: Path, manifest: dict, tensors: dict, model: nn.Module, optimizer, par, state: dict
) -> list:
    """Add the optimizer's tensors to ``state`` (allocated as the checkpoint stores them, this
    rank's experts only); returns the saved parameter groups by index order of ``optimizer``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = manifest.get("optimizer")
    if not saved:
        raise CheckpointError(f"checkpoint {path} has no optimizer state to resume from")
    names = _param_names(model, optimizer)
    saved_names = [g["params"] for g in saved["param_groups"]]
    part = _partial(par)  # a stage's groups: part of each saved group
    fits = (
        len(saved_names) == len(names) and all(set(n) <= set(sn) for n, sn in zip(names, saved_names))
        if part
        else saved_names == names
    )
    if not fits:
        raise CheckpointError(
            f"checkpoint {path} does not fit this optimizer: its parameter groups hold other "
            f"parameters ({[len(n) for n in saved_names]} per group; this optimizer: {[len(n) for n in names]})"
        )
    params = dict(model.named_parameters())
    for k, v in tensors.items():
        if not k.startswith(OPTIM) or not isinstance(v, TensorStorageMetadata):
            continue
        name = k[len(OPTIM) :].rsplit(".", 1)[0]
        if part and name not in params:
            continue  # another stage's
        if name not in params:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model: optimizer state for an unknown parameter {name!r}"
            )
        p = params[name]
        shape, dtype = tuple(v.size), v.properties.dtype
        if _is_dtensor(p) and shape == tuple(p.shape):  # a DTensor parameter: its state is laid out like it
            from torch.distributed.tensor import DTensor

            local = torch.empty(p.to_local().shape, dtype=dtype, device=p.device)
            state[k] = DTensor.from_local(
                local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
        else:
            state[k] = torch.empty(shape, dtype=dtype, device=p.device if len(shape) else "cpu")
    return [dict(g, params=n) for g, n in zip(saved["param_groups"], names)] if part else saved["param_groups"]


def _load_optimizer(path: Path, optimizer, manifest: dict, state: dict, groups: list) -> None:
    index = {name: i for i, name in enumerate(n for g in groups for n in g["params"])}
    opt_state: dict = {}
    for k, v in state.items():
        if k.startswith(OPTIM):
            name, key = k[len(OPTIM) :].rsplit(".", 1)
            i = index[name]
            opt_state.setdefault(i, {})[key] = v
    for k, v in (manifest["optimizer"].get("scalars") or {}).items():
        name, key = k.rsplit(".", 1)
        if name in index:  # (a pipeline stage reads its own parameters' only)
            opt_state.setdefault(index[name], {})[key] = v
    # JSON made tuples (AdamW's betas) lists: give them back the optimizer's own types
    param_groups = [
        {
            **{k: tuple(v) if isinstance(v, list) and isinstance(cur.get(k), tuple) else v for k, v in g.items()},
            "params": [index[n] for n in g["params"]],
        }
        for g, cur in zip(groups, optimizer.param_groups)
    ]
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": param_groups})
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} does not fit this optimizer: {_one_line(err)}") from err


# ---------------------------------------------------------------------------------------------- conversion
def read_full_state(path: Union[str, Path], *, optimizer: bool = True) -> tuple[dict, Optional[dict], dict, dict]:
    """(model state, optimizer state dict as ``torch.optim.Optimizer.state_dict()`` gives it, rng
    states, meta) of a DCP checkpoint, as full tensors in this process (no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    manifest = read_manifest(path)
    md, tensors = _read_metadata(path, manifest)
    state = {
        k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
        for k, v in tensors.items()
        if isinstance(v, TensorStorageMetadata) and (optimizer or not k.startswith(OPTIM))
    }
    error = _verify_items(path, manifest, md, set(state), 0, 1)
    if error:
        raise CheckpointError(error)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"reading the checkpoint {path} failed: {_one_line(err)}") from err
    per_rank = set(manifest.get("per_rank", ()))
    model_state = {k[len(MODEL) :]: v for k, v in state.items() if k.startswith(MODEL)}
    model_state = {k: v[0] if k in per_rank else v for k, v in model_state.items()}  # one process: rank 0's
    rng = {k[len(RNG) :]: v for k, v in state.items() if k.startswith(RNG)}
    opt_sd = None
    if optimizer and manifest.get("optimizer"):
        groups = manifest["optimizer"]["param_groups"]
        index = {name: i for i, name in enumerate(n for g in groups for n in g["params"])}
        opt_state: dict = {}
        for k, v in state.items():
            if k.startswith(OPTIM):
                name, key = k[len(OPTIM) :].rsplit(".", 1)
                opt_state.setdefault(index[name], {})[key] = v
        for k, v in (manifest["optimizer"].get("scalars") or {}).items():
            name, key = k.rsplit(".", 1)
            opt_state.setdefault(index[name], {})[key] = v
        opt_sd = {
            "state": dict(sorted(opt_state.items())),
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups],
        }
    return model_state, opt_sd, rng, manifest["meta"]


def convert_to_single_file(path: Union[str, Path], out: Union[str, Path]) -> Path:
    """Write the one-process checkpoint file (``checkpoint.safetensors``'s format, every tensor
    with its SHA-256) holding the same state as the DCP checkpoint folder ``path``: weights,
    optimizer state, RNG states and meta. One process, no process group; the result resumes
    training exactly like the folder does."""
    model_state, opt_sd, rng, meta = read_full_state(path)
    save_checkpoint(out, None, model_state=model_state, optimizer_state=opt_sd, rng=rng, meta=meta)
    read_checkpoint(out)  # verify what was written
    return Path(out)


__all__ = [
    "DCP_DIR",
    "save_distributed",
    "load_distributed",
    "read_full_state",
    "convert_to_single_file",
    "read_manifest",
    "resolve",
    "repair",
    "remove",
]
