"""Sites and splits: by patient, seeded, with clear errors for empty or tiny sites."""

from __future__ import annotations

from pathlib import Path

import pytest

from privseg.core.errors import DataError
from privseg.data.cache import SliceCache
from privseg.data.msd import read_task
from privseg.data.sites import (
    MIN_SITE_PATIENTS,
    SPLITS,
    assign_sites,
    load_site_map,
    split_patients,
)

IDS = [f"p{i:02d}" for i in range(20)]


def _members(sites: dict[str, list[str]]) -> list[str]:
    return sorted(p for ids in sites.values() for p in ids)


def test_iid_sites_are_equal_seeded_and_disjoint() -> None:
    sites = assign_sites(IDS, 3, "iid", seed=1)
    assert sorted(len(v) for v in sites.values()) == [6, 7, 7]
    assert _members(sites) == IDS
    assert sites == assign_sites(IDS, 3, "iid", seed=1)
    assert sites != assign_sites(IDS, 3, "iid", seed=2)


def test_non_iid_sites_are_unequal_with_a_floor() -> None:
    sizes = [sorted(len(v) for v in assign_sites(IDS, 4, "non-iid", s).values()) for s in range(5)]
    assert all(min(s) >= MIN_SITE_PATIENTS and sum(s) == 20 for s in sizes)
    assert any(s[0] != s[-1] for s in sizes)


def test_site_map_json_and_csv(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("case_id,site\np00,north\np01,south\np02,north\n")
    mapping = load_site_map(tmp_path / "m.csv")
    assert assign_sites(["p00", "p01", "p02"], 2, "mapping", 0, mapping) == {
        "north": ["p00", "p02"],
        "south": ["p01"],
    }
    (tmp_path / "m.json").write_text('{"p00": "north", "p01": "south"}')
    assert load_site_map(tmp_path / "m.json") == {"p00": "north", "p01": "south"}
    with pytest.raises(DataError, match="p02"):
        assign_sites(["p00", "p01", "p02"], 2, "mapping", 0, load_site_map(tmp_path / "m.json"))


def test_empty_site_is_named() -> None:
    with pytest.raises(DataError, match="'site-4' has no patients"):
        assign_sites(IDS[:4], 5, "iid", seed=0)
    mapping = {"p00": "north", "p01": "north", "p99": "south"}  # south's patient is not in the task
    with pytest.raises(DataError, match="'south' has no patients"):
        assign_sites(["p00", "p01"], 2, "mapping", 0, mapping)


def test_site_count_must_match_the_site_map() -> None:
    with pytest.raises(DataError, match="defines 2 sites"):
        assign_sites(["p00", "p01"], 3, "mapping", 0, {"p00": "a", "p01": "b"})


def test_too_few_patients_for_train_and_test() -> None:
    with pytest.raises(DataError, match=r"'lonely' has 1 patient\(s\).*1 test, 0 train"):
        split_patients("lonely", ["p00"], 0.2, 0.2, seed=0)
    two = split_patients("pair", ["p00", "p01"], 0.2, 0.2, seed=0)
    assert (len(two["train"]), len(two["val"]), len(two["test"])) == (1, 0, 1)


def test_split_is_seeded_and_covers_every_patient_once() -> None:
    splits = split_patients("s", IDS, 0.2, 0.2, seed=3)
    assert [len(splits[k]) for k in SPLITS] == [12, 4, 4]
    assert sorted(p for k in SPLITS for p in splits[k]) == IDS
    assert splits == split_patients("s", IDS, 0.2, 0.2, seed=3)


def test_cache_keeps_each_patient_in_one_site_and_split(
    phantom_cache: SliceCache, phantom_dir: Path
) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for site in phantom_cache.sites:
        for name in SPLITS:
            split = phantom_cache.split(site, name)
            for index, pid in enumerate(split.patient_ids):
                assert pid not in seen, f"{pid} in {seen.get(pid)} and {(site, name)}"
                seen[pid] = (site, name)
                z = split.z[split.patient == index]
                assert len(z) == len(set(z.tolist())) > 0  # all its slices, each once
    assert sorted(seen) == sorted(c.case_id for c in read_task(phantom_dir).cases)
    # the phantom's sites.json drives the partition ("auto")
    assert phantom_cache.sites == ["site-0", "site-1", "site-2"]
    assert all(seen[f"liver_{i:03d}"][0] == f"site-{i // 4}" for i in range(12))
    counts = phantom_cache.counts()
    assert all(counts[s]["test"]["patients"] >= 1 for s in phantom_cache.sites)
