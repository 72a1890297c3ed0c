"""The sweep behind the federated defaults: Dice of federated schedules at equal compute.

    python bench/federated_sweep.py --out /tmp/sweep [--data TASK_OR_CACHE]
        [--variant NAME=key=value,key=value ...] [--threads 2]

``--variant`` (repeatable) runs those variants instead of the built-in list.

Without ``--data`` it builds the demo's phantom (3 sites x 10 patients, as ``make demo``).
Every federated variant is compared with centralised and local-only training at the same
compute (``study.compute = "equal"``: rounds x local_steps sequential steps, batch_size slices
per site and step; centralised takes a pooled batch of sites x batch_size). The baselines run
once per distinct compute. Prints one row per variant and the last line is JSON with every
number; docs/BENCHMARKS.md has the table that chose the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from privseg.config import Config
from privseg.data.cache import SliceCache
from privseg.data.phantom import synth_task
from privseg.data.prepare import prepare_cache
from privseg.runs.compute import compute_of, equalise
from privseg.runs.train import train

# name -> overrides of the default config (``--variant`` adds or replaces)
VARIANTS: dict[str, dict[str, Any]] = {
    "r6_l8": {"federated.rounds": 6, "federated.local_steps": 8},
    "r12_l4": {"federated.rounds": 12, "federated.local_steps": 4},
    "r24_l2": {"federated.rounds": 24, "federated.local_steps": 2},
    "r48_l1": {"federated.rounds": 48, "federated.local_steps": 1},
}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, body = text.partition("=")
    changes: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        try:
            changes[key] = json.loads(value)  # numbers, booleans, lists
        except json.JSONDecodeError:
            changes[key] = value  # a plain string such as fedadam
    return name, changes


def open_data(args: argparse.Namespace, cfg: Config) -> SliceCache:
    if args.data:
        data = Path(args.data)
        if (data / "manifest.json").is_file():
            return SliceCache.open(data)
        return prepare_cache(data, args.out / "cache", cfg.data, seed=cfg.seed)
    task = args.out / "phantom"
    if not (task / "dataset.json").is_file():
        synth_task(task, sites=3, patients_per_site=10, seed=0)
    return prepare_cache(task, args.out / "cache", cfg.data, seed=cfg.seed)


def run(cfg: Config, cache: SliceCache, out: Path, mode: str) -> dict[str, Any]:
    results_file = out / "results.json"
    if results_file.is_file():  # a sweep is resumable: finished cells are kept
        return json.loads(results_file.read_text())
    return train(cfg, data=Path(cache.root), out=out, mode=mode)  # type: ignore[arg-type]


def cross_site(local: dict[str, Any]) -> dict[str, float]:
    """The best other site's local-only model on each site's test split."""
    best: dict[str, float] = {}
    for site in local["sites"]:
        for other, dice in site["cross"].items():
            best[other] = max(best.get(other, 0.0), dice)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", default="")
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--dp-epsilon", type=float, default=0.0, help="also run federated DP at this target"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    variants = dict(parse_variant(v) for v in args.variant) or dict(VARIANTS)
    base = Config.from_dict({"train": {"threads": args.threads}})
    cache = open_data(args, base)
    sizes = {s: len(cache.split(s, "train")) for s in cache.sites}
    rows = []
    for name, changes in variants.items():
        cfg = base.replace(**changes)
        cells: dict[str, dict[str, Any]] = {}
        started = time.perf_counter()
        for mode in ("central", "local", "federated"):
            mcfg = equalise(cfg, mode, len(cache.sites))
            # baselines depend only on their own (equalised) config: share them across variants
            key = "federated-" + name if mode == "federated" else f"{mode}-{_digest(mcfg)}"
            cells[mode] = run(mcfg, cache, args.out / key, mode)
            cells[mode]["compute"] = compute_of(mcfg, mode, sizes)
        if args.dp_epsilon:
            dcfg = cfg.replace(
                **{
                    "privacy.enabled": True,
                    "privacy.target_epsilon": args.dp_epsilon,
                    "privacy.noise_multiplier": None,
                }
            )
            # each variant in a data home of its own (its own ledger store and registry), so
            # every DP cell starts from the same spend; phantom patients only
            os.environ["XDG_DATA_HOME"] = str(args.out / f"data-home-{name}")
            cells["federated_dp"] = run(dcfg, cache, args.out / f"federated_dp-{name}", "federated")
        fed = cells["federated"]
        best_local = cross_site(cells["local"])
        fed_sites = {s["name"]: s["dice"] for s in fed["sites"]}
        row = {
            "variant": name,
            "changes": changes,
            "central": cells["central"]["dice_mean"],
            "local": cells["local"]["dice_mean"],
            "federated": fed["dice_mean"],
            "gap_to_central": cells["central"]["dice_mean"] - fed["dice_mean"],
            "federated_dp": cells.get("federated_dp", {}).get("dice_mean"),
            "dp_epsilon": cells.get("federated_dp", {}).get("epsilon_run_max"),
            "beats_local_cross_site": all(fed_sites[s] > d for s, d in best_local.items()),
            "best_local_cross_site": best_local,
            "federated_sites": fed_sites,
            "federated_seconds": fed["wall_seconds"],
            "seconds_per_round": fed["seconds_per_round"],
            "compute": {m: c["compute"] for m, c in cells.items()},
            "sweep_seconds": time.perf_counter() - started,
        }
        rows.append(row)
        print(
            f"{name:>14}  central {row['central']:.3f}  local {row['local']:.3f}  "
            f"federated {row['federated']:.3f}  gap {row['gap_to_central']:+.3f}  "
            f"DP {row['federated_dp'] or float('nan'):.3f}  "
            f"beats local cross-site: {row['beats_local_cross_site']}  "
            f"{row['federated_seconds']:.0f} s",
            flush=True,
        )
    print(json.dumps({"rows": rows}))


def _digest(cfg: Config) -> str:
    """Of what a centralised or local-only run depends on (not the federated section)."""
    import hashlib

    raw = {k: v for k, v in cfg.to_dict().items() if k not in ("federated", "study")}
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:10]


if __name__ == "__main__":
    main()
