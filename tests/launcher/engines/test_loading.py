"""Sharded loading (launcher/engines/loading.py): every rank reads only its own part.

Real torchrun jobs (gloo, 2 and 3 ranks). Each rank's FSDP2 rows and ZeRO-3
partitions must equal, bit for bit, the matching part of `from_pretrained` in one
process, for a base directory sharded over several files (index json) and for a
stage checkpoint; logits equal the single-process model's (so the recomputed rotary
buffers are right); a second engine built from what the first read (a stage's
training engine after its scoring engine) gets the same weights even after the first
engine's weights moved; tied embeddings and a bf16 model from fp32 files load alike.
A ~240 MiB Llama checks each rank's peak host memory.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from ncft.masks.layout import chunk_rows, flat_partition
from tests.support.spawn import REPO, torchrun
from tests.support.tiny import tiny_llama

pytestmark = pytest.mark.dist

WORKER = REPO / "tests" / "dist" / "sharded_load_worker.py"
# What a rank may hold beyond its shard and the largest single tensor: torch and
# DeepSpeed bookkeeping plus allocator slack (measured: 8-17 MiB above the shard).
ALLOWANCE_MIB = 32


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A base HF dir split over several files, a stage checkpoint of other weights, and
    a model with tied embeddings (its file holds `embed_tokens.weight` only)."""
    root = tmp_path_factory.mktemp("weights")
    tiny_llama(seed=0).save_pretrained(root / "base", max_shard_size="20KB")
    assert (root / "base" / "model.safetensors.index.json").is_file()
    stage = tiny_llama(seed=5).state_dict()
    save_file({k: v.contiguous() for k, v in stage.items()}, root / "stage.safetensors")
    tied = tiny_llama(seed=7)
    tied.config.tie_word_embeddings = True
    type(tied)(tied.config).save_pretrained(root / "tied")
    return root


def _references(root) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    def load(name):
        return AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float32).eval()

    stage = load("base")
    stage.load_state_dict(load_file(root / "stage.safetensors"))  # the old per-rank path
    return {"base": load("base"), "stage": stage, "tied": load("tied")}


def _own_part(backend: str, full: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    if backend in ("fsdp2", "single"):
        lo, hi = chunk_rows(full.shape[0], world, rank)
        return full[lo:hi]
    start, stop, per_rank = flat_partition(full.numel(), world, rank)
    part = torch.zeros(per_rank, dtype=full.dtype)
    part[: stop - start] = full.reshape(-1)[start:stop]
    return part


def _check_rank(out, backend: str, name: str, ref, world: int, rank: int,
                tol: float = 1e-5) -> None:
    params = dict(ref.named_parameters())
    got = load_file(out / f"{backend}.{name}.rank{rank}.safetensors")
    assert {k[6:] for k in got if k.startswith("shard.")} == set(params)
    for fqn, full in params.items():
        want = _own_part(backend, full.detach(), world, rank)
        assert torch.equal(got["shard." + fqn], want), (backend, name, rank, fqn)
        if "replay." + fqn in got:
            assert torch.equal(got["replay." + fqn], want), (backend, name, rank, fqn)
    with torch.no_grad():
        logits = ref(input_ids=got["batch"]).logits.float()
    torch.testing.assert_close(got["logits"], logits, rtol=tol, atol=tol)
    if rank == 0:
        for fqn, full in params.items():
            assert torch.equal(got["full." + fqn], full.detach()), (backend, fqn)
    report = json.loads((out / f"{backend}.{name}.rank{rank}.json").read_text())
    assert report["source"] == "files"


# 3 ranks only: uneven shards are the harder case, and 2 ranks run in every other
# dist test (tests/launcher/engines/test_frozen.py, test_run_e2e.py, ...).
@pytest.mark.parametrize("world", [3])
def test_every_rank_holds_its_part_of_from_pretrained(tmp_path, sources, world):
    torchrun(WORKER, world, [
        "--out", str(tmp_path), "--model-dir", str(sources / "base"), "--replay",
        "--sources", f"base={sources / 'base'}", f"stage={sources / 'stage.safetensors'}",
    ])
    refs = _references(sources)
    for backend in ("fsdp2", "deepspeed"):
        for name in ("base", "stage"):
            for rank in range(world):
                _check_rank(tmp_path, backend, name, refs[name], world, rank)
                replay = json.loads(
                    (tmp_path / f"{backend}.{name}.rank{rank}.replay.json").read_text()
                )
                assert replay["source"] == "memory" and replay["read_mib"] == 0


def test_tied_embeddings(tmp_path, sources):
    torchrun(WORKER, 2, ["--out", str(tmp_path), "--model-dir", str(sources / "tied"),
                         "--sources", f"tied={sources / 'tied'}"])
    ref = _references(sources)["tied"]
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    for backend in ("fsdp2", "deepspeed"):
        for rank in range(2):
            _check_rank(tmp_path, backend, "tied", ref, 2, rank)


def test_single_engine_loads_from_files_once(tmp_path, sources):
    # One process: the whole model, straight from the files onto the device; tied
    # embeddings stay tied although `to_empty` unties them.
    common = ["--out", str(tmp_path), "--backends", "single"]
    torchrun(WORKER, 1, [*common, "--model-dir", str(sources / "base"), "--replay",
                         "--sources", f"base={sources / 'base'}",
                         f"stage={sources / 'stage.safetensors'}"])
    torchrun(WORKER, 1, [*common, "--model-dir", str(sources / "tied"),
                         "--sources", f"tied={sources / 'tied'}"])
    refs = _references(sources)
    for name in ("base", "stage", "tied"):
        _check_rank(tmp_path, "single", name, refs[name], 1, 0)


def test_bf16_compute_from_float32_files(tmp_path, sources):
    # The 7B path: bf16 compute over fp32 masters. FSDP2's shards are the files' fp32
    # values; ZeRO-3's compute partitions are those values rounded to bf16 (as
    # from_pretrained(dtype=bfloat16) rounds them) while both gather the exact fp32.
    from transformers import AutoModelForCausalLM

    torchrun(WORKER, 2, [
        "--out", str(tmp_path), "--model-dir", str(sources / "base"),
        "--sources", f"base={sources / 'base'}", "--dtype", "bfloat16",
    ])
    ref32 = dict(AutoModelForCausalLM.from_pretrained(sources / "base").named_parameters())
    ref16 = dict(AutoModelForCausalLM.from_pretrained(
        sources / "base", dtype=torch.bfloat16).named_parameters())
    for backend, ref in (("fsdp2", ref32), ("deepspeed", ref16)):
        for rank in range(2):
            got = load_file(tmp_path / f"{backend}.base.rank{rank}.safetensors")
            for fqn, full in ref.items():
                want = _own_part(backend, full.detach(), 2, rank)
                assert torch.equal(got["shard." + fqn], want), (backend, rank, fqn)
            if rank == 0:
                for fqn, full in ref32.items():
                    assert torch.equal(got["full." + fqn], full.detach()), (backend, fqn)


@pytest.mark.gpu
def test_sharded_load_onto_the_gpu(tmp_path, sources):
    # One rank on NCCL: the shards are filled on the GPU, rotary buffers recomputed there.
    torchrun(WORKER, 1, [
        "--out", str(tmp_path), "--model-dir", str(sources / "base"), "--replay",
        "--sources", f"base={sources / 'base'}", f"stage={sources / 'stage.safetensors'}",
    ], env={"DS_ACCELERATOR": "cuda"})
    refs = _references(sources)
    for backend in ("fsdp2", "deepspeed"):
        for name in ("base", "stage"):
            _check_rank(tmp_path, backend, name, refs[name], 1, 0, tol=1e-4)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """A random ~240 MiB fp32 Llama (63M parameters; largest tensor 16 MiB)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("big")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=16,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    model.save_pretrained(path)
    return path, shapes


def _shard_mib(backend: str, shapes, world: int, rank: int) -> float:
    total = 0
    for shape in shapes.values():
        if backend == "fsdp2":
            lo, hi = chunk_rows(shape[0], world, rank)
            total += (hi - lo) * math.prod(shape[1:])
        else:
            total += flat_partition(math.prod(shape), world, rank)[2]
    return total * 4 / 2**20


@pytest.mark.parametrize("world", [3])  # uneven shards; 2 ranks as above
@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_peak_host_memory_is_one_shard(tmp_path, big_model, backend, world):
    path, shapes = big_model
    torchrun(WORKER, world, ["--out", str(tmp_path), "--model-dir", str(path),
                             "--sources", f"base={path}", "--backends", backend,
                             "--memory-only"])
    full_mib = sum(math.prod(s) for s in shapes.values()) * 4 / 2**20
    largest_mib = max(math.prod(s) for s in shapes.values()) * 4 / 2**20
    for rank in range(world):
        report = json.loads((tmp_path / f"{backend}.base.rank{rank}.json").read_text())
        shard = _shard_mib(backend, shapes, world, rank)
        # Each rank reads exactly its own elements from the files.
        assert report["read_mib"] == pytest.approx(shard, abs=0.1), report
        if rank == 0:
            continue  # the bound is on the other ranks; rank 0 loads alike
        bound = shard + largest_mib + ALLOWANCE_MIB
        assert report["peak_added_mib"] < bound < full_mib, (report, shard, bound, full_mib)
