"""`ncft data show|stats`: the prompts a spec's task feeds the model, cuts included."""

import json

import pytest
from transformers import AutoTokenizer

from launcher.cli import main
from launcher.run.models import resolve_model
from tests.support.spawn import REPO

SPEC = str(REPO / "examples" / "tiny_ncft.yaml")


@pytest.fixture(scope="module", autouse=True)
def tok(tmp_path_factory):
    """The tiny model's tokenizer; built here, before any test captures its output."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NCFT_CACHE", str(tmp_path_factory.mktemp("ncft_cache")))
        yield AutoTokenizer.from_pretrained(resolve_model("tiny-random-llama"))


def test_show_json_is_what_training_encodes(capsys, tok):
    # agnews needs 161 tokens for its fixed parts with the byte-level tokenizer.
    assert main(["data", "show", SPEC, "tasks.1.max_length=200", "--task", "agnews",
                 "--split", "train", "--limit", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3
    for row in rows:
        assert {"prompt", "answer", "tokens", "truncated"} <= set(row)
        assert row["prompt"].startswith("What is the topic of the following paragraph? "
                                        "Choose one from the option.\nOption: ")
        assert row["prompt"].endswith("\nAnswer:")
        assert row["tokens"]["prompt"] == len(tok(row["prompt"])["input_ids"])
        assert row["tokens"]["answer"] == len(tok(" " + row["answer"])["input_ids"]) + 1  # EOS
        assert row["tokens"]["prompt"] + row["tokens"]["answer"] <= 200
        kept = row["text_tokens"]
        assert row["truncated"] == (kept["kept"] < kept["total"])
    assert any(row["truncated"] for row in rows)  # agnews texts exceed 200 bytes


def test_show_text_and_a_task_that_does_not_fit(capsys, monkeypatch):
    assert main(["data", "show", SPEC, "--task", "sst2", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- sst2 test #0: prompt ") and ">>> answer: " in out
    monkeypatch.delenv("NCFT_DEBUG", raising=False)
    assert main(["data", "show", SPEC, "tasks.0.max_length=100", "--task", "sst2"]) == 2
    assert "tasks[sst2].max_length: 100" in capsys.readouterr().err
    assert main(["data", "show", SPEC, "--task", "nope"]) == 2
    assert "the spec's tasks are ['sst2', 'agnews', 'rte']" in capsys.readouterr().err


def test_stats_reports_the_share_of_text_kept(capsys):
    assert main(["data", "stats", SPEC, "tasks.0.max_length=400", "tasks.0.train_size=4",
                 "tasks.1.train_size=4", "tasks.2.train_size=4", "--json"]) == 0
    stats = {s["task"]: s for s in json.loads(capsys.readouterr().out)}
    assert list(stats) == ["sst2", "agnews", "rte"]
    for s in stats.values():
        assert s["fixed_parts_need"] <= s["max_length"]
        for split in ("train", "test"):
            part = s[split]
            assert part["share_kept"] == part["text_kept"] / part["text_tokens"]
            assert 0 < part["share_kept"] <= 1
    assert stats["sst2"]["test"]["cut"] == 0  # short reviews fit 400 bytes whole
    assert stats["sst2"]["test"]["share_kept"] == 1
    assert stats["rte"]["test"]["cut"] == 16  # two sentences in 176 - 166 bytes do not
    assert stats["rte"]["test"]["share_kept"] < 0.1
    assert main(["data", "stats", SPEC, "tasks.0.train_size=4", "tasks.1.train_size=4",
                 "tasks.2.train_size=4"]) == 0
    assert "| rte | 176 | 166 |" in capsys.readouterr().out
