"""Every extension point of privseg and its built-in plug-ins: one table each, one line each.

The config validates names against these tables (``rule(one_of=...)``), the CLI help lists them,
and each layer looks its plug-in up here (``TABLE.get(name)``). Built-ins are named by
``"module:attribute"`` and imported on first use, so importing the config stays light (no
torch, Opacus or Flower). A plug-in outside privseg registers itself with
``@TABLE.register(name)``. What each kind of plug-in is: docs/ARCHITECTURE.md ("Adding a model /
reader / accountant / gradient path / strategy").
"""

from __future__ import annotations

from typing import Any

from privseg.core.registry import Registry

#: ``model.name`` -> ``build(cfg: ModelConfig, classes: int) -> nn.Module``. ``widths``: the
#: model's channel counts as multiples of ``model.features`` (GroupNorm groups must divide each).
MODELS: Registry[Any] = Registry("model.name")
MODELS.add("unet", "privseg.models.unet:build", help="a compact 2D U-Net", widths=(1, 2, 4, 8))
MODELS.add("monet", "privseg.models.monet:build", help="Ziller et al.'s MoNet", widths=(1, 2, 4))

#: An input format -> :class:`privseg.data.task.Reader`, for ``data prepare`` / training (a task
#: folder) and ``predict`` (one CT). Tried in this order (nnU-Net's dataset.json before MSD's,
#: the fallback); ``ct`` says what one CT of the format is, for help texts.
READERS: Registry[Any] = Registry("input format")
READERS.add("nnunet", "privseg.data.nnunet:READER", help="nnU-Net v2 dataset (dataset.json)")
READERS.add(
    "msd", "privseg.data.msd:READER", help="MSD task (dataset.json)", ct="a .nii/.nii.gz file"
)
READERS.add(
    "dicom",
    "privseg.data.dicom_task:READER",
    help="DICOM series (series.csv)",
    ct="a DICOM series folder",
)

#: ``privacy.accountant`` -> an Opacus-style accountant class: ``cls()`` with a ``history`` list
#: of ``(noise_multiplier, sample_rate, steps)`` and ``get_epsilon(delta=...)``.
ACCOUNTANTS: Registry[Any] = Registry("privacy.accountant")
ACCOUNTANTS.add("prv", "opacus.accountants:PRVAccountant", help="privacy loss random variables")
ACCOUNTANTS.add("rdp", "opacus.accountants:RDPAccountant", help="Renyi DP")

#: ``privacy.grad_path`` -> a per-unit gradient path (:data:`privseg.privacy.dp_sgd.GradPathFn`);
#: every path gives the same clipped sums. ``"auto"`` is not a path: it picks one per device.
GRAD_PATHS: Registry[Any] = Registry("privacy.grad_path")
GRAD_PATHS.add("batched", "privseg.privacy.dp_sgd:batched_path", help="our batched pass")
GRAD_PATHS.add("loop", "privseg.privacy.dp_sgd:loop_path", help="one backward per unit")
GRAD_PATHS.add("opacus", "privseg.privacy.opacus_grads:hooks_path", help="Opacus hooks")
GRAD_PATHS.add("functorch", "privseg.privacy.opacus_grads:functorch_path", help="Opacus vmap(grad)")

#: ``federated.strategy`` -> ``(cfg: Config) -> (Flower strategy class, its arguments)``.
#: ``mean_only``: the server works on the mean update (no robust aggregation); ``proximal``:
#: the sites get the global weights for a proximal term.
STRATEGIES: Registry[Any] = Registry("federated.strategy")
STRATEGIES.add("fedavg", "privseg.federated.strategies:fedavg", help="federated averaging")
STRATEGIES.add(
    "fedprox", "privseg.federated.strategies:fedprox", help="FedAvg + proximal term", proximal=True
)
STRATEGIES.add(
    "fedadam", "privseg.federated.strategies:fedadam", help="server Adam", mean_only=True
)

#: ``federated.aggregation`` -> ``(fed: FederatedConfig) -> (Flower strategy class, its
#: arguments)``: the mean (weighted by ``federated.weighted``) or a robust rule.
#: ``sites_per_malicious``: the rule needs ``k * malicious_sites + 3`` sites.
AGGREGATIONS: Registry[Any] = Registry("federated.aggregation")
AGGREGATIONS.add("mean", "privseg.federated.strategies:mean", help="(weighted) mean")
AGGREGATIONS.add("median", "privseg.federated.strategies:median", help="coordinate median")
AGGREGATIONS.add("trimmed_mean", "privseg.federated.strategies:trimmed_mean", help="trimmed mean")
AGGREGATIONS.add("krum", "privseg.federated.strategies:krum", help="Krum", sites_per_malicious=2)
AGGREGATIONS.add(
    "multikrum", "privseg.federated.strategies:multikrum", help="Multi-Krum", sites_per_malicious=2
)
AGGREGATIONS.add(
    "bulyan", "privseg.federated.strategies:bulyan", help="Bulyan", sites_per_malicious=4
)


def input_formats() -> str:
    """What a task folder may be, for help texts and errors: every reader's help."""
    return _or([READERS.help(name) for name in READERS])


def ct_formats() -> str:
    """What one CT given to ``predict`` may be: every reader that reads one."""
    return _or([str(READERS.info(name)["ct"]) for name in READERS if "ct" in READERS.info(name)])


def _or(items: list[str]) -> str:
    return ", ".join(items[:-1]) + f" or {items[-1]}" if len(items) > 1 else "".join(items)
