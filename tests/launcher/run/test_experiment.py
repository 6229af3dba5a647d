"""`eval.reference`: the per-task run whose scores are FG's A_i, checked before a run."""

import json

import pytest

from launcher.run.experiment import fg_reference
from launcher.spec.schema import validate_spec


def test_eval_reference_gives_a_i_per_read_out_and_refuses_mismatches(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()

    def spec(**eval_fields):
        return validate_spec({"tasks": [{"source": {"type": "cl_benchmark", "name": "sst2"}},
                                        {"source": {"type": "cl_benchmark", "name": "rte"}}],
                              "method": "ncft", "eval": {"reference": "ref", **eval_fields},
                              "output": {"dir": str(tmp_path / "run")}}, tmp_path)

    with pytest.raises(ValueError, match="eval.reference: .* does not exist"):
        fg_reference(spec(), ["sst2", "rte"])
    results = {"method": "per_task", "tasks": ["rte", "sst2"],
               "matrix": [[0.6, None], [None, 0.9]],
               "protocol": {"classification": "rank", "calibration": "none"}}
    (ref / "results.json").write_text(json.dumps(results))
    assert fg_reference(spec(), ["sst2", "rte"]) == {"raw": [0.9, 0.6]}
    with pytest.raises(ValueError, match="eval.reference: the reference run scored "
                       "classification by 'rank', this run by 'generate'"):
        fg_reference(spec(classification="generate"), ["sst2", "rte"])
    (ref / "results.json").write_text(json.dumps({**results, "method": "ncft"}))
    with pytest.raises(ValueError, match="eval.reference: the FG reference must be a "
                       "per_task run"):
        fg_reference(spec(), ["sst2", "rte"])
