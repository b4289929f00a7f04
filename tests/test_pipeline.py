"""The pipeline of passes (`pipeline.core`, `pipeline.run`): contracts checked on both sides, skipped passes
reported, a failing pass named with its error's type kept, and a real run's passes in order with their stages."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from onnxslim_prune import api
from onnxslim_prune.errors import ModelError
from onnxslim_prune.ops.testing import assert_same_outputs, parse, weights, zeroed
from onnxslim_prune.pipeline import Pass, PassContractError, PassManager, PassStatus
from onnxslim_prune.pipeline.run import RUN_PASSES
from onnxslim_prune.progress import Stage, StageClock


@dataclass
class Numbers:
    start: int | None = None
    doubled: int | None = None
    total: int | None = None


class Double(Pass[Numbers]):
    stage = Stage.METHOD
    requires = frozenset({"start"})
    ensures = frozenset({"doubled"})

    def call(self, state: Numbers) -> None:
        assert state.start is not None
        state.doubled = 2 * state.start


class Total(Pass[Numbers]):
    requires = frozenset({"start", "doubled"})
    ensures = frozenset({"total"})

    def call(self, state: Numbers) -> None:
        assert state.start is not None and state.doubled is not None
        state.total = state.start + state.doubled


class Forgetful(Pass[Numbers]):
    """Claims `total` and never sets it."""

    ensures = frozenset({"total"})

    def call(self, state: Numbers) -> None:
        pass


class Never(Pass[Numbers]):
    def applies(self, state: Numbers) -> bool:
        return False

    def call(self, state: Numbers) -> None:
        raise AssertionError("a pass that does not apply is not called")


class Broken(Pass[Numbers]):
    def call(self, state: Numbers) -> None:
        raise ModelError("the model cannot be read")


def test_passes_run_in_order_and_report_what_they_did() -> None:
    clock = StageClock()
    state = Numbers(start=3)
    results = PassManager([Double(), Never(), Total()]).run(state, clock)
    assert (state.doubled, state.total) == (6, 9)
    assert [(r.name, r.status) for r in results] == [
        ("Double", PassStatus.RAN), ("Never", PassStatus.SKIPPED), ("Total", PassStatus.RAN)]
    assert results[0].stage is Stage.METHOD and Stage.METHOD.value in clock.seconds  # timed in its stage
    assert all(r.seconds >= 0 for r in results) and results[1].seconds == 0


def test_a_pass_without_what_it_requires_is_a_contract_error() -> None:
    state = Numbers(start=3)
    with pytest.raises(PassContractError, match="Total requires doubled"):
        PassManager([Total()]).run(state, StageClock())
    assert state.total is None  # never called


def test_a_pass_that_leaves_what_it_ensures_unset_is_a_contract_error() -> None:
    with pytest.raises(PassContractError, match="Forgetful left total unset"):
        PassManager([Forgetful()]).run(Numbers(), StageClock())


def test_a_failing_pass_is_named_and_its_error_keeps_its_type() -> None:
    manager: PassManager[Numbers] = PassManager([Double(), Broken(), Total()])
    with pytest.raises(ModelError, match="cannot be read") as caught:
        manager.run(Numbers(start=1), StageClock())
    assert manager.failed == "Broken"
    assert "(in pass Broken)" in getattr(caught.value, "__notes__", ["(in pass Broken)"])  # a note from Python 3.11


def test_every_run_pass_states_its_contract_and_the_first_needs_only_the_start() -> None:
    """Each field a pass requires is set at the start of the run or ensured by an earlier pass."""
    available = {"original"}  # what `RunState.start` sets among the optional fields
    for step in RUN_PASSES:
        assert step.requires <= available, step.name
        available |= step.ensures
    assert {"report", "pruned", "verdict"} <= available


CHAIN = """<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,8,8] x) => (float[1,2,8,8] y) {
  a = Conv <pads = [1, 1, 1, 1]> (x, w1)
  r = Relu (a)
  y = Conv (r, w2)
}"""


def test_a_run_lists_its_passes_and_prunes_zero_channels_with_outputs_unchanged() -> None:
    model = parse(CHAIN, w1=zeroed(weights(8, 3, 3, 3), (1, 4, 5, 6)), w2=weights(2, 8, 1, 1))
    result = api.prune(model, "l1", 0.5, round_to=1, latency=False)
    assert result.model.graph.initializer[0].dims[0] == 4  # the four zero channels went
    assert_same_outputs(model, result.model)
    ran = {r.name: r.status for r in result.passes}
    assert [r.name for r in result.passes] == [type(p).__name__ for p in RUN_PASSES]
    assert ran["ApplyPass"] is PassStatus.RAN and ran["NothingPrunedPass"] is PassStatus.SKIPPED
    assert ran["LatencyPass"] is PassStatus.SKIPPED and ran["RecoverPass"] is PassStatus.SKIPPED
    # the report's stage seconds are the stages of the passes that ran
    stages = {r.stage.value for r in result.passes if r.status is PassStatus.RAN and r.stage is not None}
    assert stages <= set(result.report.stage_seconds)


def test_a_run_that_prunes_nothing_skips_apply_and_says_why() -> None:
    model = parse(CHAIN, w1=weights(8, 3, 3, 3), w2=weights(2, 8, 1, 1))
    result = api.prune(model, "l1", 0.0, latency=False)
    ran = {r.name: r.status for r in result.passes}
    assert ran["NothingPrunedPass"] is PassStatus.RAN and ran["ApplyPass"] is PassStatus.SKIPPED
    assert Stage.APPLY.value not in result.report.stage_seconds
    assert any(n.startswith("nothing was pruned") for n in result.report.notes)
    assert_same_outputs(model, result.model)
