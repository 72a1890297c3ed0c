"""results.json: the schema table in docs/RESULTS.md and core.results' typed schema agree."""

from __future__ import annotations

import math
import re
from pathlib import Path

from privseg.config import PrivacyConfig
from privseg.core.results import (
    FEDERATION_KEYS,
    PROVENANCE_KEYS,
    RUN_KEYS,
    SITE_KEYS,
    SITE_OPTIONAL_KEYS,
    SLICE_UNIT_NOTE,
    RunResult,
    SiteResult,
    nanmean,
)
from privseg.privacy.history import RELEASE_KEYS

SCHEMA_DOC = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"


def documented_schema() -> tuple[set[str], set[str]]:
    """(top-level keys, sites[] keys) named in the results.json table of docs/RESULTS.md."""
    text = SCHEMA_DOC.read_text()
    block = text.split("<!-- results-schema:start -->")[1].split("<!-- results-schema:end -->")[0]
    top: set[str] = set()
    site: set[str] = set()
    for line in block.splitlines():
        cells = line.split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`"):
            continue
        keys = set(re.findall(r"`([a-z_0-9]+)(?:\[\])?`", cells[1]))
        top |= keys
        if keys == {"sites"}:
            site = set(re.findall(r"`([a-z_0-9]+)(?:\[\])?`", cells[2]))
    return top, site


def test_the_docs_name_every_results_key_and_no_other() -> None:
    top, site = documented_schema()
    assert top == {*RUN_KEYS, *FEDERATION_KEYS, *PROVENANCE_KEYS}
    patient_keys = {"id", "dice", "hd95"}
    assert site - patient_keys - set(RELEASE_KEYS) <= {*SITE_KEYS, *SITE_OPTIONAL_KEYS}
    assert set(RELEASE_KEYS) <= site
    assert {*SITE_KEYS, *SITE_OPTIONAL_KEYS} <= site


def test_a_written_result_has_exactly_the_documented_keys(tmp_path: Path) -> None:
    privacy = {"epsilon": 2.5, "delta": 1e-5, "noise_multiplier": 1.1, "accountant": "prv"}
    sites = [
        SiteResult.from_test(
            "a", 10, {"dice": 0.8, "patients": [{"id": "p", "dice": 0.8}]}, privacy
        ),
        SiteResult.from_test("b", 12, {"dice": None, "patients": []}, {**privacy, "epsilon": 3.0}),
    ]
    sites[1].completed = False
    result = RunResult.of(PrivacyConfig(enabled=True), "federated", sites, history=[])
    result.federation = dict.fromkeys(FEDERATION_KEYS, 1)
    result.provenance["run_id"] = "r"
    out = result.write(tmp_path / "results.json")
    assert set(out) == {*RUN_KEYS, *FEDERATION_KEYS, "run_id", "privacy_note"}
    assert out["privacy_note"] == SLICE_UNIT_NOTE
    assert out["epsilon_max"] == 3.0  # the largest site epsilon, never an average
    assert out["dice_mean"] == 0.8  # pooled over patients; a site with none adds nothing
    assert math.isnan(out["sites"][1]["dice"])  # missing is NaN, never 0
    assert set(out["sites"][0]) == set(SITE_KEYS)
    assert out["sites"][0]["sample_rate"] is None and out["sites"][1]["completed"] is False


def test_without_dp_the_privacy_fields_are_none() -> None:
    site = SiteResult.from_test("a", 1, {"dice": 0.5}, None)
    result = RunResult.of(PrivacyConfig(enabled=False), "central", [site], history=[])
    out = result.to_dict()
    assert out["dp"] is False and out["unit"] is None and out["epsilon_max"] is None
    assert "privacy_note" not in out and out["sites"][0]["epsilon"] is None
    assert out["dice_mean"] == 0.5  # no patients: the site means


def test_nanmean_skips_none_and_nan() -> None:
    assert nanmean([1.0, None, math.nan, 3.0]) == 2.0
    assert math.isnan(nanmean([])) and math.isnan(nanmean([None, math.nan]))
