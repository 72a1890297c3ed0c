"""Issue 24, third review: a crashed or resumed federation never reports another model's
answers, never keeps too few, replays what a resume may not change, and a site's evaluation
reply is checked for its values (not only its keys)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from conftest import InProcessGrid, fake_factory, fake_ledger, handle, small_cfg
from privseg.config import Config
from privseg.core.errors import DataError, FederationError
from privseg.core.io import read_json
from privseg.core.run_folder import RunFolder, RunInputs
from privseg.federated import client_app as ca
from privseg.federated import messages as M
from privseg.federated.rounds import ServerSettings, run_server
from privseg.federated.strategy import make_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity")

SITES = {1: "a", 2: "b"}


class SiteGrid(InProcessGrid):
    """Node n is site SITES[n] with its own folder and trainers (its own process); it counts
    the final test requests it gets; ``answer_final=False``: the sites never answer them."""

    def __init__(self, root: Path, answer_final: bool = True) -> None:
        super().__init__()
        self.root, self.answer_final = root, answer_final
        self.trainers: dict[int, dict] = {n: {} for n in SITES}
        self.final_requests = 0

    def get_node_ids(self) -> Iterable[int]:
        return list(SITES)

    def answer(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if M.CONFIG in msg.content and int(msg.content[M.CONFIG].get(M.CFG_FINAL, 0)):
            self.final_requests += 1
            if not self.answer_final:
                return None
        folder = self.root / SITES[node]
        folder.mkdir(exist_ok=True)
        shared = ca._TRAINERS
        ca._TRAINERS = self.trainers[node]
        try:
            return handle(msg, ca.SiteSettings(SITES[node], folder, folder), fake_factory)
        finally:
            ca._TRAINERS = shared


def _cfg(**fed) -> Config:
    return small_cfg(**{"round_timeout": 0.5, **fed}).replace(**{"privacy.enabled": False})


def _settings(cfg: Config, out: Path, resume: bool = False) -> ServerSettings:
    return ServerSettings(cfg=cfg, out_dir=out, run_id="run-1", resume=resume, node_wait=1.0)


def test_a_resume_that_adds_rounds_asks_the_final_test_of_the_new_model(tmp_path: Path) -> None:
    """Class 1/3: `federated.rounds` is resumable, but a finished run's final_test.json (same
    run id) is reused after the added rounds: results.json then reports the old model's test
    Dice beside the new model's checkpoint and history (seen with `privseg train --mode
    federated --resume --set federated.rounds=2` after a 1-round run: same dice_mean, new
    checkpoint.pt)."""
    out = tmp_path / "run"
    run_server(SiteGrid(tmp_path), _settings(_cfg(rounds=1), out))
    grid = SiteGrid(tmp_path)
    summary = run_server(grid, _settings(_cfg(rounds=2), out, resume=True))
    assert [h["round"] for h in summary["history"]] == [1, 2]
    assert grid.final_requests > 0, "the round-2 model's test answers are round 1's"


def test_a_final_test_nobody_answered_is_not_kept_as_the_runs_answer(tmp_path: Path) -> None:
    """Class 3: when no site answers the final test (a timeout, every site failing, e.g. a DP
    site whose worker restarted after its last round), the server keeps an empty
    final_test.json, marks the run completed and exits 0 with a NaN Dice; a later --resume
    replays the empty answers forever."""
    out = tmp_path / "run"
    cfg = _cfg(rounds=1)
    with contextlib.suppress(FederationError):  # refusing is fine; keeping nothing is not
        run_server(SiteGrid(tmp_path, answer_final=False), _settings(cfg, out))
    kept = RunFolder(out).final_test
    assert not (kept.is_file() and read_json(kept)["test"] == {}), kept.read_text()
    grid = SiteGrid(tmp_path)
    summary = run_server(grid, _settings(cfg, out, resume=True))
    assert set(summary["test"]) == {"a", "b"}


def test_a_resume_that_changes_a_resumable_field_still_replays_the_lost_round(
    tmp_path: Path,
) -> None:
    """Class 3: the replay digest hashes the whole config TOML, so a resume with a changed
    resumable field (round_timeout, threads, device, rounds) misses the stored reply; the site
    trains the lost round again (a real DP site raises 'already recorded its N planned
    steps', so the round fails and the run stops short)."""
    folder = tmp_path / "a"
    folder.mkdir()
    settings = ca.SiteSettings("a", folder, folder)
    state = {"w": np.zeros(3, dtype=np.float32)}

    def request(cfg: Config) -> Message:
        config = ConfigRecord(
            {
                M.CFG_TOML: cfg.to_toml(),
                M.CFG_RUN_ID: "run-1",
                M.CFG_ROUND: 1,
                M.CFG_LOCAL_STEPS: 3,
                M.CFG_PLANNED_STEPS: 6,
            }
        )
        return Message(
            RecordDict({M.ARRAYS: M.array_record(state), M.CONFIG: config}),
            dst_node_id=1,
            message_type="train",
        )

    ca.handle_train(request(_cfg()), settings, fake_factory)
    spent = read_json(fake_ledger(folder, "a"))["steps"]
    ca.handle_train(request(_cfg(round_timeout=99.0)), settings, fake_factory)  # the resume
    assert read_json(fake_ledger(folder, "a"))["steps"] == spent, "the lost round was trained again"


def _eval_reply(node: int, site: str, metrics: dict, releases: str | None = None) -> Message:
    req = Message(RecordDict({M.CONFIG: ConfigRecord()}), dst_node_id=node, message_type="evaluate")
    site_rec = {"name": site, **({M.RELEASES: releases} if releases is not None else {})}
    content = RecordDict({M.METRICS: MetricRecord(metrics), M.SITE: ConfigRecord(site_rec)})
    return Message(content, reply_to=req)


@pytest.mark.parametrize(
    "metrics",
    [
        {M.DICE: 1e300, M.NUM_EXAMPLES: 2.0, M.N_PATIENTS: 2.0},
        {M.DICE: -4.0, M.NUM_EXAMPLES: 2.0, M.N_PATIENTS: 2.0},
        {M.DICE: 0.5, M.NUM_EXAMPLES: math.nan, M.N_PATIENTS: -7.0},
        {M.DICE: 0.5, M.NUM_EXAMPLES: 2.0, M.N_PATIENTS: 2.0, M.EPSILON: -3.0},
        {M.DICE: 0.5, M.NUM_EXAMPLES: 2.0, "dice_class_0": math.inf},
    ],
)
def test_an_evaluation_reply_with_impossible_values_is_refused(metrics: dict) -> None:
    """Class 2: evaluation replies are checked for keys only; a site's final test Dice of
    1e300 (or -4, inf; an epsilon of -3 in a DP run) becomes results.json's dice_mean."""
    strategy = make_strategy(small_cfg())
    good = _eval_reply(1, "a", {M.DICE: 0.5, M.NUM_EXAMPLES: 2.0, M.N_PATIENTS: 2.0})
    strategy.aggregate_evaluate(3, [good, _eval_reply(2, "b", metrics)])
    assert list(strategy.last_evaluate) == ["a"], strategy.last_evaluate


def test_a_release_list_that_is_not_releases_is_refused() -> None:
    """Class 2: the release list a DP site sends goes into results.json unchecked (any JSON
    list: numbers, strings, an epsilon of 'lots')."""
    strategy = make_strategy(small_cfg())
    junk = json.dumps([{"epsilon": "lots", "steps": -1}, 42, "x"])
    reply = _eval_reply(2, "b", {M.DICE: 0.5, M.NUM_EXAMPLES: 2.0}, junk)
    strategy.aggregate_evaluate(3, [reply])
    assert "b" not in strategy.last_releases, strategy.last_releases


@pytest.mark.parametrize("mode", ["server", "federated"])
def test_a_fresh_run_over_an_unfinished_federation_is_refused_without_resume(
    tmp_path: Path, mode: str
) -> None:
    """Class 1/3: `privseg server --out R` (or `privseg train --mode federated --out R`)
    without --resume over a federation that crashed (federated_state.pt, no results.json) is
    admitted: the saved rounds are silently dropped and every site spends its privacy again
    (seen: a new run id replaced the saved one). A finished run is refused without --resume;
    an unfinished one should be too (or say that it starts over)."""
    run = RunFolder(tmp_path / "run")
    inputs = RunInputs(mode, None if mode == "server" else "0" * 64)
    run.admit(inputs)
    run.federated_state.write_bytes(b"round 3 of 5")  # the crashed run's saved state
    with pytest.raises(DataError, match="--resume"):
        run.admit(inputs)


def test_a_site_is_told_it_may_leave_only_for_the_run_its_report_is_of(tmp_path: Path) -> None:
    """Review of #24: `done` for any run id let a hostile (or confused) server end a reused
    site folder's `privseg site` with the previous federation's report."""
    settings = ca.SiteSettings("a", tmp_path, tmp_path)
    settings.report.parent.mkdir(parents=True)
    settings.report.write_text(json.dumps({"run_id": "old-run"}))

    def done(run_id: str) -> Message:
        config = ConfigRecord({M.CFG_RUN_ID: run_id})
        return Message(RecordDict({M.CONFIG: config}), dst_node_id=1, message_type="query")

    ca.handle_done(done("new-run"), settings)
    assert not settings.done.exists()
    ca.handle_done(done("old-run"), settings)
    assert settings.done.read_text() == "old-run\n"


def test_the_norm_bound_is_anchored_to_the_runs_first_model_after_a_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of #24: a resumed server anchored the update norm bound to the model it resumed
    from (which a site may have grown round by round), not to the run's first model."""
    import privseg.federated.rounds as rounds
    from privseg.federated.state import initial_state
    from privseg.federated.validation import model_norm

    anchors: list[float] = []
    made = rounds.make_strategy

    def spy(*args, **kwargs):
        strategy = made(*args, **kwargs)
        original = strategy.start

        def start(arrays):
            original(arrays)
            anchors.append(strategy.first_norm)

        strategy.start = start
        return strategy

    monkeypatch.setattr(rounds, "make_strategy", spy)
    out = tmp_path / "run"
    run_server(SiteGrid(tmp_path), _settings(_cfg(rounds=1), out))
    run_server(SiteGrid(tmp_path), _settings(_cfg(rounds=2), out, resume=True))
    first = model_norm({k: v.numpy() for k, v in initial_state(_cfg()).items()})
    assert len(anchors) == 2 and anchors == pytest.approx([first, first], rel=1e-5)
