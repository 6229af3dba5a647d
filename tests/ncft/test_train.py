"""`ncft.train.check_finite`: an inf/nan loss or gradient norm stops or skips a step,
and every rank reaches the same verdict (the loss is per rank, the verdict is not)."""

from __future__ import annotations

import math

import torch

from ncft.train import Diverged, NonFinite, StepLog, check_finite
from tests.support.fake_engine import ThreadWorld

INF, NAN = math.inf, math.nan


def _verdicts(losses: list[float], norm: float, policy: NonFinite, skipped: int = 0):
    """Each rank's result of `check_finite` (its StepLog or the Diverged it raised)."""
    world = ThreadWorld(len(losses))

    def body(engine):
        log = StepLog(step=3, loss=losses[engine.rank], grad_norm=norm)
        try:
            return check_finite(engine, log, policy, skipped)
        except Diverged as err:
            return err

    return world.run(torch.nn.Linear(1, 1), body)


def test_a_finite_step_passes_unchanged():
    out = _verdicts([0.5, 0.7], 1.0, NonFinite())
    assert [o.skipped for o in out] == [False, False]


def test_one_rank_with_a_nan_loss_stops_every_rank_at_that_step():
    out = _verdicts([0.5, NAN], NAN, NonFinite("stop"))
    assert all(isinstance(o, Diverged) for o in out)
    assert "at step 3" in str(out[0]) and "on_nonfinite" in str(out[0])
    named = out[0].at("task agnews (stage 2/3)")
    assert "in task agnews (stage 2/3) at step 3" in str(named)


def test_skip_step_marks_the_step_until_the_limit():
    ok = _verdicts([INF, INF], INF, NonFinite("skip_step", limit=2), skipped=1)
    assert [o.skipped for o in ok] == [True, True]
    over = _verdicts([INF, INF], INF, NonFinite("skip_step", limit=2), skipped=2)
    assert all(isinstance(o, Diverged) for o in over)
    assert "max_skipped_steps=2" in str(over[0])


def test_a_loss_scaler_overflow_is_skipped_not_stopped_on():
    out = _verdicts([0.5, 0.5], INF, NonFinite("stop", loss_scaler=True))
    assert [o.skipped for o in out] == [True, True]
    # A non-finite loss is not an overflow the scaler recovers from.
    out = _verdicts([NAN, 0.5], NAN, NonFinite("stop", loss_scaler=True))
    assert all(isinstance(o, Diverged) for o in out)


def test_a_nan_loss_with_a_finite_norm_stops_even_when_skipping():
    # The engines skip an update only on a bad norm, so this update was applied.
    out = _verdicts([NAN, 0.5], 2.0, NonFinite("skip_step"))
    assert all(isinstance(o, Diverged) for o in out)
    assert "update was applied" in str(out[0])
