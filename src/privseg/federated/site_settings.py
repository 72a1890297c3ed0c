"""Where one site's data, privacy ledger and local report live, resolved from a SuperNode's
node config (deployment) or its partition id (simulation): what a ClientApp and ``privseg
site`` both need, without Flower."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privseg.core.errors import DataError
from privseg.core.run_folder import RunFolder
from privseg.federated import messages as M


@dataclass(frozen=True)
class SiteSettings:
    """Where one site's data, privacy ledger and local report live."""

    site: str
    data_dir: Path
    out_dir: Path
    privacy_config: Path | None = None  # the site's own [privacy] settings win over the server's

    @property
    def report(self) -> Path:
        """The site-local test report (per-patient results never leave the site)."""
        return RunFolder(self.out_dir).site_report(self.site)

    @property
    def refused(self) -> Path:
        """Written on the final test when the server accepted none of this site's training
        replies in the run (a wrong key: the server registered another site's)."""
        return self.report.with_suffix(".refused")

    @property
    def done(self) -> Path:
        """Written when the server has kept the final test answers (the site may leave)."""
        return RunFolder(self.out_dir).site_done(self.site)


def site_settings(node_config: Mapping[str, Any], defaults: Mapping[str, Any]) -> SiteSettings:
    """Resolve the site from the node config (deployment) or its partition id (simulation)."""
    conf = {**defaults, **node_config}
    site = conf.get(M.NODE_SITE)
    if not site and M.NODE_PARTITION in conf and conf.get(M.NODE_SITES):
        sites = str(conf[M.NODE_SITES]).split(",")
        site = sites[int(conf[M.NODE_PARTITION])]
    if not site or not conf.get(M.NODE_DATA_DIR):
        raise DataError(
            "this SuperNode has no site: start it with --node-config "
            f"\"{M.NODE_SITE}='NAME' {M.NODE_DATA_DIR}='CACHE_DIR' {M.NODE_OUT_DIR}='DIR'\" "
            "(privseg site does this)"
        )
    data_dir = Path(str(conf[M.NODE_DATA_DIR]))
    out_dir = Path(str(conf.get(M.NODE_OUT_DIR) or data_dir / "site-out"))
    privacy = Path(str(conf[M.NODE_PRIVACY])) if conf.get(M.NODE_PRIVACY) else None
    return SiteSettings(site=str(site), data_dir=data_dir, out_dir=out_dir, privacy_config=privacy)
