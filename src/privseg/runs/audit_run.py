"""``privseg audit RUN --whole-run``: the one-run audit of the training a run folder holds.

Every DP trainer of the run (``central``, or each site of a local run) committed its canaries'
seed hash before training and revealed the seed and its step scores after it
(:mod:`privseg.privacy.canaries`). This checks the seed against the commitment, rebuilds every
canary, scores it for two threat models, and bounds epsilon from below
(:mod:`privseg.attack.one_run`):

- ``every_step``: an adversary who sees each released (noised) DP-SGD gradient sum; the score
  is the max over steps of the canary's cosine with it (the white-box worst case; a server
  that sees per-round updates sees less, so its bound can only be lower);
- ``final_model``: whoever holds the final model; the cosine with final - initial weights
  (Adam rescales coordinates, so this score is weaker than a plain-SGD one).

Each also gets Andrew et al.'s one-shot estimate (an estimate, not a bound).

A bound above the run's reported epsilon (``epsilon_run``: this run's releases alone, what the
canaries can measure) means the training leaked more than it accounted: the audit fails.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from privseg.attack.one_run import audit_scores, one_shot_estimate
from privseg.core.errors import DataError
from privseg.core.io import read_json, write_json
from privseg.core.run_folder import RunFolder
from privseg.models.checkpoint import load_checkpoint
from privseg.models.registry import initial_model
from privseg.privacy.canaries import commitment, cosine_scores, flatten, inclusion
from privseg.training.trainer import CENTRAL

#: The claim's fields copied from a site's results.json privacy entry.
CLAIM_KEYS = ("epsilon_run", "delta", "unit", "noise_multiplier", "sample_rate", "steps",
              "max_grad_norm", "accountant")  # fmt: skip
NOTE = (
    "an empirical LOWER bound on epsilon at 95 % confidence from this one run, limited by the "
    "number of canaries (the ceiling); the accountant's epsilon stays the guarantee"
)


def audit_whole_run(run_dir: str | Path) -> dict[str, Any]:
    """Audit every DP trainer of a finished run with canaries; write and return audit_run.json."""
    started = time.perf_counter()
    folder = RunFolder(Path(run_dir))
    results = folder.load_results()
    cfg = folder.load_config()
    if not cfg.privacy.enabled or not cfg.privacy.audit_canaries:
        raise DataError(
            f"{folder.root} was trained without canaries: train with privacy.enabled = true "
            "and privacy.audit_canaries = m (docs/PRIVACY.md, one-run audit)"
        )
    privacy = {
        s.name: s.privacy
        for s in results.sites
        if s.privacy and s.privacy.get("epsilon_run") is not None
    }
    mode = results.mode
    if mode not in ("central", "local"):
        raise DataError(f"the one-run audit covers central and local runs, not {mode!r} yet")
    trainers = [CENTRAL] if mode == "central" else sorted(privacy)
    audits = []
    for name in trainers:
        claim_of = privacy[next(iter(privacy))] if name == CENTRAL else privacy[name]
        ckpt = folder.checkpoint if name == CENTRAL else folder.site_checkpoint(name)
        audits.append(_audit_trainer(folder, cfg, name, claim_of, ckpt))
    out = {
        "run": str(folder.root),
        "note": NOTE,
        "passed": all(a["passed"] for a in audits),
        "trainers": audits,
        "seconds": time.perf_counter() - started,
    }
    write_json(folder.audit_run, out)
    return out


def _audit_trainer(
    folder: RunFolder, cfg: Any, name: str, privacy: dict[str, Any], ckpt: Path
) -> dict[str, Any]:
    committed = read_json(folder.canaries(name, revealed=False))
    revealed = read_json(folder.canaries(name, revealed=True))
    seed, m = int(revealed["seed"]), int(revealed["count"])
    if commitment(seed) != committed["commitment"] or m != committed["count"]:
        raise DataError(
            f"{name}: the revealed canary seed does not match the commitment written before "
            "training: the audit cannot trust these canaries"
        )
    included = inclusion(seed, m)
    claim = {k: privacy.get(k) for k in CLAIM_KEYS}
    claimed = float(claim["epsilon_run"])
    final = load_checkpoint(ckpt)[0]
    start = initial_model(cfg.model, cfg.seed, cfg.data.n_classes)
    change = flatten(
        [f.detach() - s.detach() for f, s in zip(_trainable(final), _trainable(start), strict=True)]
    )
    scores = {
        "every_step": np.asarray(revealed["step_scores"], dtype=float),
        "final_model": cosine_scores(seed, m, change),
    }
    threats = {}
    for threat, s in scores.items():
        res = audit_scores(s, included, delta=float(claim["delta"]))
        threats[threat] = {
            **res,
            "estimate": one_shot_estimate(s, included, delta=float(claim["delta"])),
            "scores": s.tolist(),
            "passed": res["epsilon_lower"] <= claimed,
        }
    return {
        "trainer": name,
        "claim": claim,
        "canaries": {
            "kind": revealed["kind"],
            "m": m,
            "commitment": committed["commitment"],
            "seed": seed,
            "inclusion_sha256": hashlib.sha256(included.astype(np.uint8).tobytes()).hexdigest(),
            "included": int(included.sum()),
            "steps_scored": revealed["steps"],
        },
        "threat_models": threats,
        "passed": all(t["passed"] for t in threats.values()),
    }


def _trainable(model: Any) -> list[Any]:
    return [p for p in model.parameters() if p.requires_grad]
