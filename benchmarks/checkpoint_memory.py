"""Peak resident memory of the checkpoint step, and the bytes each rank writes, for `moekit train`
under torchrun (expert parallelism), for the moekit on PYTHONPATH.

    # this checkout (sharded DCP checkpoints) against an older one (e.g. the gathered single file),
    # made with: git worktree add --detach ../before <commit>
    python benchmarks/checkpoint_memory.py --before-src ../before/src

    # only this checkout, other model or layout
    python benchmarks/checkpoint_memory.py --nproc 2 -- --expert-parallel 2 --dim 128 --experts 32

Each rank runs `moekit train` in-process with `Trainer.save` timed and wrapped by
`resource.getrusage(RUSAGE_SELF).ru_maxrss` readings: the peak before the first checkpoint (the
training steps and the evaluation), the peak after it (the checkpoint step's own peak when it
is higher), and the bytes of the checkpoint files this rank wrote (DCP: its `__R_*.distcp`, plus
`.metadata` and `moekit.json` on rank 0; the single file: rank 0 writes it all)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = [
    "--expert-parallel",
    "2",
    "--dim",
    "128",
    "--experts",
    "32",
    "--set",
    "model.moe.hidden_dim=256",
    "--steps",
    "2",
    "--no-baseline",
    "--tokenizer",
    "bytes",
    "--set",
    "train.code_chars=200000",
    "--quiet",
]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def worker(out: str, train_args: list[str]) -> None:
    """One rank: moekit train with the checkpoint step measured."""
    from moekit import cli
    from moekit.train import trainer as tr

    rank = int(os.environ.get("RANK", 0))
    rec: dict = {"rank": rank, "saves": []}
    save = tr.Trainer.save

    def measured(self, *a, **k):
        before, t0 = _rss_mb(), time.perf_counter()
        save(self, *a, **k)
        after = _rss_mb()
        files = {}
        dcp = self.dir / "checkpoint.dcp"
        if dcp.is_dir():
            names = [p for p in dcp.iterdir() if p.name.startswith(f"__{rank}_")]
            if rank == 0:
                names += [dcp / ".metadata", dcp / "moekit.json"]
            files = {p.name: p.stat().st_size for p in names}
        elif rank == 0 and (self.dir / "checkpoint.safetensors").exists():
            files = {"checkpoint.safetensors": (self.dir / "checkpoint.safetensors").stat().st_size}
        rec["saves"].append(
            {
                "step": self.step,
                "maxrss_before_mb": before,
                "maxrss_after_mb": after,
                "seconds": time.perf_counter() - t0,
                "bytes_written": sum(files.values()),
                "files": files,
            }
        )

    tr.Trainer.save = measured
    code = cli.main(["train", *train_args])
    rec["exit"], rec["maxrss_end_mb"] = code, _rss_mb()
    Path(out, f"rank{rank}.json").write_text(json.dumps(rec))


def run(src: str, nproc: int, train_args: list[str], work: Path) -> list[dict]:
    out = work / "out"
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=src, OMP_NUM_THREADS="1", MOEKIT_CACHE=str(work.parent / "cache"))
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        str(Path(__file__).resolve()),
        "--worker",
        str(out),
        "--",
        "--name",
        "r",
        "--out",
        str(work / "runs"),
        *train_args,
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--before-src", help="the src folder of another moekit checkout to compare with")
    p.add_argument("train_args", nargs="*", help="moekit train arguments (after --; default: %(default)s)")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.train_args)
    train_args = args.train_args or DEFAULT
    here = str(Path(__file__).resolve().parents[1] / "src")
    variants = ([("before", args.before_src)] if args.before_src else []) + [("after", here)]
    print(f"moekit train {' '.join(train_args)}  ({args.nproc} ranks under torchrun)")
    print(
        "| moekit | rank | peak RSS before the checkpoint (MB) | peak RSS after it (MB) | checkpoint step adds (MB) | "
        "bytes written (MB) | save (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, src in variants:
            for rec in run(src, args.nproc, train_args, Path(tmp) / name):
                s = rec["saves"][-1]
                print(
                    f"| {name} | {rec['rank']} | {s['maxrss_before_mb']:.0f} | {s['maxrss_after_mb']:.0f} | "
                    f"{s['maxrss_after_mb'] - s['maxrss_before_mb']:.0f} | {s['bytes_written'] / 1e6:.1f} | "
                    f"{s['seconds']:.2f} |"
                )


if __name__ == "__main__":
    main()
