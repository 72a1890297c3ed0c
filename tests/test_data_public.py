"""The public phantom population: apart from the sites', and believed only when regenerated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from privseg.config import DataConfig
from privseg.core.errors import ConfigError, DataError
from privseg.data.phantom import GENERATOR_KEY, synth_task
from privseg.data.prepare import prepare_cache
from privseg.data.public import public_data
from privseg.data.scanners import public_scanner, scanner

TINY = {"sites": 2, "patients_per_site": 3, "size": 16, "slices": 4}
SMALL = DataConfig(resolution=16, slice_policy="all", sites=2)


def test_public_scanners_lie_outside_every_site_scanner_range() -> None:
    sites = [scanner(i, seed) for i in range(5) for seed in range(20)]
    for public in (public_scanner(i, seed) for i in range(6) for seed in range(20)):
        for name in ("hu_scale", "hu_offset", "noise", "fov", "blur"):
            values = [getattr(s, name) for s in sites]
            mine = getattr(public, name)
            assert not min(values) <= mine <= max(values), (name, mine)
        assert public.thickness not in {s.thickness for s in sites}
        assert abs(public.body - 1.0) >= 0.1 and all(s.body == 1.0 for s in sites)


def test_the_public_task_records_its_generator_and_other_patients(tmp_path: Path) -> None:
    public = synth_task(tmp_path / "public", population="public", seed=0, **TINY)
    sites = synth_task(tmp_path / "sites", seed=0, **TINY)
    record = json.loads((public / "dataset.json").read_text())[GENERATOR_KEY]
    assert record["population"] == "public" and record["seed"] == 0 and record["size"] == 16
    assert json.loads((sites / "dataset.json").read_text())[GENERATOR_KEY]["population"] == "sites"
    same = [
        (public / "imagesTr" / p.name).read_bytes() == p.read_bytes()
        for p in (sites / "imagesTr").iterdir()
    ]
    assert not any(same)
    assert set(json.loads((public / "sites.json").read_text()).values()) == {
        "public-0",
        "public-1",
    }
    with pytest.raises(ConfigError, match="population = 'hospital' is invalid"):
        synth_task(tmp_path / "x", population="hospital", **TINY)


def test_only_a_regenerated_public_task_makes_a_public_cache(tmp_path: Path) -> None:
    public = synth_task(tmp_path / "public", population="public", seed=3, **TINY)
    cache = prepare_cache(public, tmp_path / "public-cache", SMALL, seed=0)
    record = public_data(cache)
    assert record is not None and record["seed"] == 3 and "verified" in record
    sites = synth_task(tmp_path / "sites", seed=3, **TINY)
    assert public_data(prepare_cache(sites, tmp_path / "sites-cache", SMALL, seed=0)) is None


def test_a_private_task_that_claims_to_be_public_is_refused(tmp_path: Path) -> None:
    """The claim copied into another data set's dataset.json: its voxels give it away."""
    sites = synth_task(tmp_path / "sites", seed=3, **TINY)
    public = synth_task(tmp_path / "public", population="public", seed=3, **TINY)
    meta = json.loads((sites / "dataset.json").read_text())
    meta[GENERATOR_KEY] = json.loads((public / "dataset.json").read_text())[GENERATOR_KEY]
    (sites / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="this data is not public"):
        prepare_cache(sites, tmp_path / "cache", SMALL, seed=0)
    meta[GENERATOR_KEY] = {"population": "public", "seed": "x"}
    (sites / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="is not a privseg generator record"):
        prepare_cache(sites, tmp_path / "cache", SMALL, seed=0)
