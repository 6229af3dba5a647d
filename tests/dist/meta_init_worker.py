"""One launched job: FSDP2 with real weights on rank 0 only, meta elsewhere.

Run under torchrun by tests/launcher/engines/test_fsdp2_meta_init.py (and, with
`fsdp1` as second argument, by its GPU test: FSDP1's sync_module_states). Rank 0 builds
the tiny Llama with real weights, every other rank builds it on the meta device;
the engine broadcasts rank 0's parameters and buffers. Every rank then runs the same
batch; each saves its logits and rank 0 saves the gathered weights and the
reference (the real model run in one process).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from launcher.dist import init_distributed, shutdown
from launcher.engines import OptimConfig, build_engine
from tests.dist.mask_worker import gather_all
from tests.support.tiny import VOCAB, tiny_llama


def main(out: Path, backend: str = "fsdp2") -> None:
    info = init_distributed()
    torch.set_num_threads(1)
    real = tiny_llama(seed=0)
    batch = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = real(input_ids=batch).logits
    if info.rank == 0:
        model = real
        saved = {"ref." + n: t.detach().clone() for n, t in real.state_dict().items()}
        saved["ref_logits"] = reference
    else:
        with torch.device("meta"):
            model = tiny_llama(seed=0)
        assert all(p.is_meta for p in model.parameters())
    engine = build_engine(backend, model, OptimConfig(), info)
    with torch.no_grad():
        logits = engine.forward({"input_ids": batch.to(info.device)}).logits.cpu()
    save_file({"logits": logits.contiguous()}, out / f"logits_rank{info.rank}.safetensors")
    weights = gather_all(engine)
    if info.rank == 0:
        save_file({**saved, **{"got." + n: t for n, t in weights.items()}},
                  out / "weights.safetensors")
    engine.close()
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:])
