"""What `ncft run` and `ncft validate` check before anything is created or spawned.

The spec's own validation already checks the data root, the task files and the
DeepSpeed JSON (`launcher.spec`). What it cannot know is the state of this machine:
whether the model resolves here, what the data files hold (every row a task uses is
read and checked here, so a bad line is named before any rank loads a model), and
what the output directory holds. A failure
raises `UserError` naming the field and the fix, which the CLI prints as one line;
nothing has been written yet, so the corrected rerun starts clean.
"""

from __future__ import annotations

import os
from pathlib import Path

from launcher.errors import UserError
from launcher.run import models, rundir
from launcher.spec import Spec, dump_resolved

HUB_TIMEOUT_S = 5.0  # a machine without network fails fast instead of hanging


def check_model(name_or_path: str) -> str:
    """Check that `model.name_or_path` resolves on this machine, without loading it.

    Tried in order: a built-in name (its source must be installed or already
    converted), a local directory (it must hold config.json), a hub id in the local
    HF cache, and last a hub id reachable over the network (one metadata request
    with a short timeout; none with `HF_HUB_OFFLINE=1`).

    Returns:
        How it resolves: "built-in", "local directory", "hub cache" or "hub".

    Raises:
        UserError: Naming what was tried and how to fix it.
    """
    field = f"model.name_or_path={name_or_path}"
    if name_or_path in models.BUILTIN:
        try:
            models.check_builtin(name_or_path)
        except ValueError as err:
            raise UserError(str(err)) from None
        return "built-in"
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{field}: directory {path.absolute()} has no config.json; point "
                            "it at a saved Hugging Face model (save_pretrained)")
        return "local directory"
    tried = f"not a built-in name {sorted(models.BUILTIN)} and no directory {path.absolute()}"
    if name_or_path.startswith((".", "/", "~")) or not _valid_repo_id(name_or_path):
        raise UserError(f"{field}: {tried}, nor a hub id (org/name); use a built-in "
                        "name or a local model directory")
    return _check_hub(name_or_path, f"{field}: {tried};")


def _valid_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _check_hub(repo_id: str, tried: str) -> str:
    """A hub id: found in the local cache, else (if online) found on the hub."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return "hub cache"
    where = f"hub model {repo_id} is not in the local cache ({constants.HF_HUB_CACHE})"
    fix = f"download it first (hf download {repo_id}), or use a local directory or a built-in name"
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{tried} {where} and HF_HUB_OFFLINE is set; {fix}")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=HUB_TIMEOUT_S)
    except Exception as err:  # network, DNS, 401/404: each one means "not usable here"
        raise UserError(f"{tried} {where} and the hub did not answer ({type(err).__name__}; "
                        f"this machine may have no network); {fix}") from None
    return "hub"


def check_output(spec: Spec) -> None:
    """Check `output.dir` against the output policy and that it can be created.

    Raises:
        UserError: If the directory holds a run and neither `output.resume` nor
            `output.overwrite` is set, or it cannot be created here.
    """
    out = spec.output
    rundir.check_policy(out.dir, dump_resolved(spec), out.resume, out.overwrite)
    parent = out.dir
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"output.dir: cannot create {out.dir} ({parent} is not a writable "
                        "directory); choose another output.dir")


def check_data(spec: Spec) -> None:
    """Read and check every row each task uses, as the ranks will (`load_task`).

    Raises:
        UserError: Naming the task, split, file, physical line and field.
    """
    from launcher.run.task_data import load_task

    for task in spec.tasks:
        load_task(task, spec.data_root)


def check_launch(spec: Spec, under_launcher: bool) -> None:
    """`ncft run` spawns one node; more nodes need an outer launcher."""
    if spec.engine.nnodes > 1 and not under_launcher:
        raise UserError(
            f"engine.nnodes={spec.engine.nnodes}: start multi-node runs with a launcher "
            "(slurm/torchrun.slurm or slurm/deepspeed.slurm); `ncft run` spawns one node"
        )


def preflight(spec: Spec, under_launcher: bool) -> None:
    """Every check `ncft run` makes before it creates or spawns anything.

    Args:
        spec: The validated spec.
        under_launcher: True if an outer launcher started this process as a rank.

    Raises:
        UserError: The first problem found, naming its field and the fix.
    """
    check_launch(spec, under_launcher)
    check_model(spec.model.name_or_path)
    check_data(spec)
    # Under a launcher every rank runs this, and rank 0 may already have created the
    # run directory by the time a slower rank looks: only rank 0 judges it.
    if not under_launcher or os.environ.get("RANK") == "0":
        check_output(spec)
