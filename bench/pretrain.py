"""Public pretraining at equal compute: the pretrained-only model, training from scratch, and
fine-tuning from the public checkpoint, scored on the demo phantom's sites' test split.

    python bench/pretrain.py --out /tmp/pretrain [--steps 150] [--threads 2]

The sites' data is the demo's phantom (3 sites x 10 patients, as ``make demo``); the public
population is privseg's (4 scanners x 8 patients, other scanners and anatomy). Every model
takes ``--steps`` central steps at the default batch size (the fine-tuned one: that many more
on the sites' data). The ledger store is a folder under ``--out`` (the scratch runs are
releases without DP on the phantom's "patients"). The last line is JSON with every number;
docs/PRETRAINING.md has the table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from privseg.config import Config
from privseg.core.results import nanmean
from privseg.data.cache import SliceCache
from privseg.data.phantom import synth_task
from privseg.data.prepare import prepare_cache
from privseg.evaluation.evaluate import evaluate_split
from privseg.models.checkpoint import load_checkpoint
from privseg.runs.pretrain import PublicPopulation, pretrain
from privseg.runs.train import train


def sites_dice(checkpoint: Path, cache: SliceCache) -> dict[str, float]:
    """Dice per patient volume of a checkpoint on each site's test split, and their mean."""
    model, _, _ = load_checkpoint(checkpoint)
    scores = {s: evaluate_split(model, cache.split(s, "test"))["dice"] for s in cache.sites}
    return {**scores, "mean": nanmean(scores.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ["PRIVSEG_LEDGER_DIR"] = str(args.out / "ledger")
    cfg = Config().replace(
        **{"train.steps": args.steps, "train.epochs": 3, "train.threads": args.threads}
    )
    task = args.out / "phantom"
    if not (task / "dataset.json").is_file():
        synth_task(task, sites=3, patients_per_site=10, seed=0)
    cache = prepare_cache(task, args.out / "cache", cfg.data, seed=cfg.seed)
    rows: dict[str, Any] = {}
    started = time.perf_counter()
    pretrain(cfg, out=args.out / "pretrain", population=PublicPopulation())
    public = args.out / "pretrain" / "checkpoint.pt"
    rows["pretrained only"] = {
        **sites_dice(public, cache),
        "seconds": time.perf_counter() - started,
    }
    for name, changes in (("from scratch", {}), ("fine-tuned", {"train.init": str(public)})):
        started = time.perf_counter()
        out = args.out / name.replace(" ", "-")
        train(cfg.replace(**changes), data=cache.root, out=out, mode="central")
        rows[name] = {
            **sites_dice(out / "checkpoint.pt", cache),
            "seconds": time.perf_counter() - started,
        }
    for name, row in rows.items():
        sites = "  ".join(f"{s} {row[s]:.3f}" for s in cache.sites)
        print(f"{name:16s} Dice {row['mean']:.3f}  ({sites})  {row['seconds']:.0f} s")
    print(json.dumps({"steps": args.steps, "batch_size": cfg.train.batch_size, "rows": rows}))


if __name__ == "__main__":
    main()
