"""A failing rank is reported by the parent in one line, in that rank's own words."""

from __future__ import annotations

import os
import signal

import pytest

from launcher.errors import RanksFailed, UserError
from launcher.run.spawn import run_local

pytestmark = pytest.mark.dist


def _value_error_on_rank_1() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("tasks[0]: a row has no label")


def _bug_on_rank_0() -> None:
    if os.environ["RANK"] == "0":
        raise KeyError("weight\nname")


def _killed_rank_1() -> None:
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)


def test_value_error_in_a_rank_is_a_user_error():
    with pytest.raises(UserError) as err:
        run_local(_value_error_on_rank_1, 2)
    assert str(err.value) == "tasks[0]: a row has no label"


def test_other_exceptions_name_rank_and_type_on_one_line():
    with pytest.raises(RanksFailed) as err:
        run_local(_bug_on_rank_0, 2)
    assert str(err.value) == "rank 0: KeyError: 'weight\\nname'"


def test_a_killed_rank_names_the_signal():
    with pytest.raises(RanksFailed, match="rank 1 was killed by SIGKILL"):
        run_local(_killed_rank_1, 2)
