"""`make gpu-check`: everything this project can only verify on a GPU, in one short run.

Three parts, each in its own subprocess with its own time limit, so one failure does
not hide the others (the whole check is sized for under 8 minutes on one GPU):

1. the `gpu`-marked tests (`pytest -m gpu`): bf16 over NCCL on every engine, ZeRO-3
   with CPU offload, device-correct collectives on CUDA;
2. one masked bf16 training run per engine at world size 1 over NCCL
   (`ncft masked-train --dtype bfloat16`), each with its change report: no element
   outside the NeuronSet may change, and the selected elements must (fp32 masters);
3. the mask-overhead benchmark on a ~1.1B random-init Llama (TinyLlama's shape), masked
   vs unmasked step time and peak device memory (`benchmarks/mask_overhead.py`).

It writes `gpu_check.json` (everything, with the card's name and versions) and
`gpu_check.md` (the tables) into `--out`. It never pretends: without CUDA it exits 2.

    python benchmarks/gpu_check.py --out gpu-check-out
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("single", "fsdp2", "fsdp1", "deepspeed")


def _run(cmd: list[str], timeout: int, log: Path) -> dict:
    """Run `cmd` from the repo root; keep its output in `log`; never raise."""
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        out = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(
            errors="replace")
    log.write_text(out)
    return {"cmd": " ".join(cmd), "rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
            "log": log.name, "tail": out[-1500:]}


def machine() -> dict:
    """The card, the driver-visible memory and the software versions."""
    import torch

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(0), "gpu_memory_bytes": props.total_memory,
        "gpu_count": torch.cuda.device_count(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "python": sys.version.split()[0],
    }


def gpu_tests(out: Path, timeout: int) -> dict:
    """Part 1: pytest -m gpu, with the pass/fail counts parsed from its summary line."""
    import importlib.util

    # The gpu tests each start their own ranks (mostly one GPU each): with pytest-xdist
    # (the GPU image has it) several run side by side on the one card.
    xdist = ["-n", "4"] if importlib.util.find_spec("xdist") else []
    r = _run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
              "-o", "addopts=", "-rfEs", *xdist, "tests"], timeout, out / "gpu_tests.log")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", r["tail"])}
    return {**r, "counts": counts}


def masked_runs(out: Path, timeout: int, dtype: str) -> list[dict]:
    """Part 2: one masked bf16 `ncft masked-train` per engine, world size 1, NCCL."""
    rows = []
    for backend in ENGINES:
        run_dir = out / f"masked_{backend}"
        r = _run([sys.executable, "-m", "launcher", "masked-train", "--model",
                  "tiny-random-llama", "--data", "README.md", "--out", str(run_dir),
                  "--backend", backend, "--nproc", "1", "--steps", "5", "--fraction", "0.1",
                  "--seq-len", "64", "--lr", "1e-4", "--dtype", dtype],
                 timeout, out / f"masked_{backend}.log")
        report = run_dir / "report.json"
        if report.is_file():
            params = json.loads(report.read_text())["parameters"]
            r["outside_selection_changed"] = sorted(
                k for k, v in params.items() if v["outside_selection_changed"])
            r["selected_changed_elements"] = sum(v["changed"] for v in params.values())
        rows.append({"engine": backend, **r})
    return rows


def benchmark(out: Path, timeout: int, dtype: str) -> dict:
    """Part 3: masked vs unmasked step time and peak memory on the 1.1B Llama."""
    result = out / "mask_overhead_1b.json"
    r = _run([sys.executable, "benchmarks/mask_overhead.py", "--nproc", "1", "--configs", "1b",
              "--engines", "fsdp2,deepspeed,fsdp1", "--dtype", dtype, "--out", str(result)],
             timeout, out / "mask_overhead_1b.log")
    if result.is_file():
        r["results"] = json.loads(result.read_text())["results"]
    return r


def markdown(report: dict) -> str:
    """The tables of `gpu_check.md`."""
    m = report["machine"]
    lines = [f"# GPU check on {m['gpu']} ({m['gpu_memory_bytes'] / 2**30:.0f} GiB), "
             f"torch {m['torch']}, CUDA {m['cuda']}, NCCL {m['nccl']}", ""]
    t = report["gpu_tests"]
    lines += [f"**gpu-marked tests**: rc {t['rc']}, {t.get('counts')}, {t['wall_s']} s", ""]
    lines += ["| engine (ws1, NCCL, bf16) | rc | wall s | elements changed outside the set "
              "| selected elements changed |", "|---|---|---|---|---|"]
    for r in report["masked_runs"]:
        lines.append(f"| {r['engine']} | {r['rc']} | {r['wall_s']} | "
                     f"{r.get('outside_selection_changed', 'n/a')} | "
                     f"{r.get('selected_changed_elements', 'n/a')} |")
    b = report["benchmark"]
    lines += ["", f"**1.1B Llama, masked vs unmasked** (rc {b['rc']}, {b['wall_s']} s)", "",
              "| engine | params | unmasked step s | masked step s | ratio | peak memory GiB |",
              "|---|---|---|---|---|---|"]
    for r in b.get("results", []):
        peak = r.get("peak_device_memory_bytes")
        lines.append(f"| {r['engine']} | {r['params']:,} | {r['median_unmasked_s']:.4f} | "
                     f"{r['median_masked_s']:.4f} | {r['ratio']:.3f} | "
                     f"{peak / 2**30:.2f} |" if peak else "| n/a |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--parts", default="tests,runs,bench", help="comma list to run")
    parser.add_argument("--tests-timeout", type=int, default=240)
    parser.add_argument("--run-timeout", type=int, default=45, help="per engine")
    parser.add_argument("--bench-timeout", type=int, default=150)
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing was run (never faked)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    report: dict = {"machine": machine(), "gpu_tests": {"rc": "not run", "wall_s": 0},
                    "masked_runs": [], "benchmark": {"rc": "not run", "wall_s": 0}}
    print(json.dumps(report["machine"]), flush=True)
    steps = (("tests", "gpu_tests", lambda: gpu_tests(args.out, args.tests_timeout)),
             ("runs", "masked_runs", lambda: masked_runs(args.out, args.run_timeout, args.dtype)),
             ("bench", "benchmark", lambda: benchmark(args.out, args.bench_timeout, args.dtype)))
    for part, key, fn in steps:
        if part in parts:
            report[key] = fn()
            # Written after every part: a run cut short keeps what finished.
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
            (args.out / "gpu_check.md").write_text(markdown(report))
            print(f"gpu-check: {part} done", flush=True)
    print(markdown(report), flush=True)
    ok = report["gpu_tests"]["rc"] in (0, "not run") and all(
        r["rc"] == 0 and not r.get("outside_selection_changed") for r in report["masked_runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
