"""A recording wrapper around torch.distributed's collectives, for device audits.

`install(expected)` replaces every collective in the `torch.distributed` namespace
with a wrapper that records each call made directly from project code (`launcher/`,
`ncft/`): the op, the calling line, the first project frame outside the collective
helpers (`origin`: which phase issued it), and where each tensor argument lives
(`launcher.dist.device_label`). A call is `bad` when a tensor's label differs from
`expected`, the engine's device: on GPU a real `cuda:N`, on CPU the simulated
accelerator label of `launcher.dist.SIMULATED_DEVICE_ENV`, which only tensors placed by
`launcher.dist.on_device` carry (a plain host tensor shows `cpu`). Calls from
PyTorch's or DeepSpeed's internals are not ours to check: they communicate on the
parameters' own storage.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
OURS = [str(REPO / "launcher") + "/", str(REPO / "ncft") + "/"]
HELPERS = (str(REPO / "launcher" / "dist.py"), str(REPO / "launcher" / "engines") + "/")
OBJECT_OPS = ("all_gather_object", "broadcast_object_list", "gather_object",
              "scatter_object_list", "barrier")
TENSOR_OPS = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
              "reduce_scatter", "reduce_scatter_tensor", "reduce", "gather", "scatter",
              "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv")

RECORDS: list[dict] = []


def _ours(path: str) -> bool:
    return any(path.startswith(root) for root in OURS)


def _rel(path: str) -> str:
    return str(Path(path).relative_to(REPO)) if path.startswith(str(REPO)) else path


def _origin(frame) -> str:
    """The first project frame that is not a collective helper or an engine method."""
    first = None
    while frame is not None:
        path = frame.f_code.co_filename
        if _ours(path):
            first = first or frame
            if not path.startswith(HELPERS):
                return f"{_rel(path)}:{frame.f_code.co_name}"
        frame = frame.f_back
    return f"{_rel(first.f_code.co_filename)}:{first.f_code.co_name}" if first else "?"


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _wrap(name: str, original, expected: str):
    from launcher.dist import device_label

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        frame = sys._getframe(1)
        if _ours(frame.f_code.co_filename):
            labels = [device_label(t) for v in (*args, *kwargs.values()) for t in _tensors(v)]
            record = {"op": name, "caller": f"{_rel(frame.f_code.co_filename)}:{frame.f_lineno}",
                      "origin": _origin(frame), "devices": labels,
                      "bad": any(label != expected for label in labels)}
            if name in OBJECT_OPS and expected.startswith("cuda"):
                # NCCL stages objects and barriers on the current device.
                record["devices"] = [f"cuda:{torch.cuda.current_device()}"]
                record["bad"] = record["devices"][0] != expected
            RECORDS.append(record)
        return original(*args, **kwargs)

    return wrapper


def install(expected: str, extra_roots: tuple[str, ...] = ()) -> None:
    """Wrap every collective in `torch.distributed`; `expected` is the right device label.

    Args:
        expected: The label every audited tensor must carry.
        extra_roots: More source roots to audit (the planted-bug self check).
    """
    OURS.extend(extra_roots)
    for name in (*TENSOR_OPS, *OBJECT_OPS):
        original = getattr(dist, name, None)
        if original is not None:
            setattr(dist, name, _wrap(name, original, expected))


def dump(path: Path) -> None:
    """Write this rank's records as JSON."""
    path.write_text(json.dumps(RECORDS, indent=1))
