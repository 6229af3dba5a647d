"""Preflight: the model and the output directory are judged before anything is made."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.run import preflight, rundir
from launcher.spec import dump_resolved, load_spec
from tests.support.spawn import REPO

SPEC = REPO / "examples" / "tiny_ncft.yaml"


def _spec(tmp_path: Path, *overrides: str):
    return load_spec(SPEC, [f"output.dir={tmp_path / 'run'}", *overrides])


def test_builtin_and_local_directory_resolve(tmp_path):
    assert preflight.check_model("tiny-random-llama") == "built-in"
    (tmp_path / "config.json").write_text("{}")
    assert preflight.check_model(str(tmp_path)) == "local directory"


@pytest.mark.parametrize("name", ["/nonexistent", "./no/such/dir", "~/nope", "bad name!"])
def test_missing_paths_and_bad_ids_name_the_field(name):
    with pytest.raises(UserError, match=r"^model\.name_or_path=.*no directory .*hub id"):
        preflight.check_model(name)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        preflight.check_model(str(tmp_path))


def _fake_cache(root: Path, repo_id: str) -> None:
    """The layout huggingface_hub's cache uses for one downloaded file."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")


def test_hub_ids_resolve_from_the_local_cache_only_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _fake_cache(tmp_path, "org/cached")
    assert preflight.check_model("org/cached") == "hub cache"
    with pytest.raises(UserError) as err:
        preflight.check_model("org/missing")
    message = str(err.value)
    assert message.startswith("model.name_or_path=org/missing:")
    assert "not in the local cache" in message and "HF_HUB_OFFLINE" in message


def test_unreachable_hub_says_there_may_be_no_network(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # A port nothing listens on: the request fails at once, like a machine offline.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UserError, match="may have no network"):
        preflight.check_model("org/missing")


def test_output_policy_is_checked_before_anything_exists(tmp_path):
    spec = _spec(tmp_path)
    preflight.check_output(spec)
    assert not spec.output.dir.exists(), "a check creates nothing"
    rundir.prepare(spec.output.dir, dump_resolved(spec), False, False)
    with pytest.raises(UserError, match=r"^output\.dir: .* output\.resume=true .* "
                                        r"output\.overwrite=true"):
        preflight.check_output(spec)
    preflight.check_output(_spec(tmp_path, "output.resume=true"))
    preflight.check_output(_spec(tmp_path, "output.overwrite=true"))
    with pytest.raises(UserError, match=r"^output\.resume: the spec differs"):
        preflight.check_output(_spec(tmp_path, "output.resume=true", "training.steps=9"))


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(UserError, match="is a file"):
        preflight.check_output(_spec(tmp_path))


# The unwritable-directory check, run by a user who cannot write the directory. Root
# writes anywhere, and CI runs as root, so there it runs as `nobody` (setpriv); the
# directory lives in a world-readable temporary folder that `nobody` can read.
CHECK_AS_USER = """
import sys
from launcher.errors import UserError
from launcher.run import preflight
from launcher.spec import load_spec
spec = load_spec(sys.argv[1], [f"output.dir={sys.argv[2]}/run"])
try:
    preflight.check_output(spec)
except UserError as err:
    print(err)
"""


def _check_as_nobody(locked: Path) -> str:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("running as root needs setpriv (util-linux) to check as another user")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1",
           "HOME": str(locked.parent)}
    cmd = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
           "-c", CHECK_AS_USER, str(SPEC), str(locked)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_output_dir_that_is_unwritable():
    with tempfile.TemporaryDirectory() as folder:
        locked = Path(folder) / "locked"
        locked.mkdir()
        os.chmod(folder, 0o755)
        os.chmod(locked, 0o555)  # nobody (and no user but root) may write it
        if os.geteuid() != 0:
            with pytest.raises(UserError, match="not a writable directory"):
                preflight.check_output(_spec(locked))
            return
        out = _check_as_nobody(locked)
    assert "output.dir: cannot create" in out and "not a writable directory" in out, out


def test_multi_node_needs_a_launcher(tmp_path):
    spec = _spec(tmp_path, "engine.nnodes=2")
    with pytest.raises(UserError, match=r"^engine\.nnodes=2: .*slurm"):
        preflight.preflight(spec, under_launcher=False)
    preflight.preflight(spec, under_launcher=True)


def test_failed_run_removes_only_what_it_created(tmp_path):
    run = rundir.prepare(tmp_path / "new", "a: 1\n", False, False)
    with pytest.raises(RuntimeError), rundir.removed_unless_started(run, created=True):
        raise RuntimeError("model failed to load")
    assert not run.root.exists()
    run = rundir.prepare(tmp_path / "started", "a: 1\n", False, False)
    run.stage_dir(0, "sst2").mkdir()
    with pytest.raises(RuntimeError), rundir.removed_unless_started(run, created=True):
        raise RuntimeError("killed in stage 2")
    assert run.root.is_dir(), "a checkpoint makes the run resumable: keep it"
    run = rundir.prepare(tmp_path / "resumed", "a: 1\n", False, False)
    with pytest.raises(RuntimeError), rundir.removed_unless_started(run, created=False):
        raise RuntimeError("a resumed run failed again")
    assert run.root.is_dir(), "a directory that held a run before is never removed"


# ---- data: every row a task uses is checked before any rank starts ------------------

GOOD = '{"text": "fine", "label": "Sports"}\n'


def _data_spec(tmp_path: Path, train: str, test: str = GOOD):
    (tmp_path / "train.jsonl").write_text(train)
    (tmp_path / "test.jsonl").write_text(test)
    task = (f"{{name: news, source: {{type: json, train: {tmp_path / 'train.jsonl'}, "
            f"test: {tmp_path / 'test.jsonl'}}}, labels: [Sports, World], train_size: 8}}")
    return _spec(tmp_path, f"tasks=[{task}]", "method=neurons")


@pytest.mark.parametrize(("train", "test", "message"), [
    # A bad line after a blank line: the physical line (3), not the third row's number.
    (GOOD + "\n" + '{"text": "x", "label": \n', GOOD,
     r"tasks\[news\] train split: .*train.jsonl:3: not valid JSON"),
    (GOOD + "\n" + '{"text": "x", "label": "Cooking"}\n', GOOD,
     r"tasks\[news\] train split: .*train.jsonl line 3: field 'label' is 'Cooking', not one "
     r"of the task's labels \['Sports', 'World'\]"),
    (GOOD, GOOD + '{"label": "World"}\n',
     r"tasks\[news\] test split: .*test.jsonl line 2: no field 'text'"),
    (GOOD, "\n\n", r"tasks\[news\] test split: .*test.jsonl has no rows"),
    (GOOD, GOOD + '{"text": ["a"], "label": "World"}\n',
     r"tasks\[news\] test split: .*test.jsonl line 2: field 'text' is list, not text"),
])
def test_data_errors_name_task_split_file_line_and_field(tmp_path, train, test, message):
    spec = _data_spec(tmp_path, train, test)
    with pytest.raises(UserError, match=message):
        preflight.preflight(spec, under_launcher=False)
    assert not (tmp_path / "run").exists()


def test_a_bad_line_beyond_the_rows_used_does_not_matter(tmp_path):
    spec = _data_spec(tmp_path, GOOD * 8 + '{"text": "x", "label": "Cooking"}\n')
    preflight.check_data(spec)  # train_size 8: line 9 is never read


@pytest.mark.dist
def test_ncft_run_names_a_bad_line_before_any_rank_starts(tmp_path):
    import subprocess
    import sys

    from tests.support.spawn import worker_env

    bad = tmp_path / "train.jsonl"
    bad.write_text(GOOD + "\n" + '{"text": "x", "label": "Cooking"}\n')
    (tmp_path / "test.jsonl").write_text(GOOD)
    task = (f"{{name: news, source: {{type: json, train: {bad}, test: {tmp_path / 'test.jsonl'}}},"
            " labels: [Sports, World]}")
    proc = subprocess.run(
        [sys.executable, "-m", "launcher", "run", str(SPEC), f"output.dir={tmp_path / 'run'}",
         f"tasks=[{task}, {task.replace('news', 'news2')}]"],
        env=worker_env({"NCFT_CACHE": str(tmp_path / "cache")}), cwd=REPO, text=True,
        capture_output=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"tasks[news] train split: {bad} line 3: field 'label' is 'Cooking'" in proc.stderr
    assert "[rank" not in proc.stdout + proc.stderr, "no rank may have started"
    assert not (tmp_path / "run").exists()
