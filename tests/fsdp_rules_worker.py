"""Run by test_fsdp.py under torchrun: every remaining rule on a sharded tiny Llama for a few
steps, then ``stats()`` (a collective), writing each rank's factors and feedback errors."""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integrations"))
import fsdp_llama  # noqa: E402

import ldfa_hf  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    errors = {}
    for rule in ("oja", "fixed", "fa", "dfa", "local"):
        model, vocab, seq = fsdp_llama.build(tiny=True, seed=0)
        fsdp_llama.shard(model)
        plugin = ldfa_hf.wrap(model, ldfa_hf.LDFAConfig(rule=rule, rank=4, refresh_every=2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for ids in fsdp_llama.batches(vocab, seq, global_batch=4, steps=3, seed=0):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            plugin.step()
        errors[rule] = plugin.stats()["mean_feedback_error"]
        save_file({k: v.contiguous() for k, v in plugin.state_dict().items()},
                  os.path.join(out, f"{rule}_rank{rank}.safetensors"))
    with open(os.path.join(out, f"errors_rank{rank}.json"), "w") as fh:
        json.dump(errors, fh)
    branch_skipping(out, rank)
    fsdp_llama.leave()


def branch_skipping(out: str, rank: int) -> None:
    """skip_branches with a bridge under FSDP2 and under DDP (whose skipped parameters get no
    gradient: find_unused_parameters): each rank's modes per step, and its final state."""
    from torch.nn.parallel import DistributedDataParallel

    config = ldfa_hf.LDFAConfig(rule="bp", skip_branches=0.5, branch_bridge=4, seed=3)
    for how in ("fsdp2", "ddp"):
        model, vocab, seq = fsdp_llama.build(tiny=True, seed=0)
        if how == "fsdp2":
            fsdp_llama.shard(model)
            plugin = ldfa_hf.wrap(model, config)
            run = model
        else:
            plugin = ldfa_hf.wrap(model, config)
            run = DistributedDataParallel(model, find_unused_parameters=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        modes = []
        for ids in fsdp_llama.batches(vocab, seq, global_batch=4, steps=5, seed=rank if how == "ddp" else 0):
            modes.append([b.mode for b in plugin.branches.values()])
            run(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            plugin.step()
        state = {k: v.contiguous() for k, v in plugin.state_dict().items() if k.startswith("__branch__")}
        save_file(state, os.path.join(out, f"branches_{how}_rank{rank}.safetensors"))
        with open(os.path.join(out, f"branch_modes_{how}_rank{rank}.json"), "w") as fh:
            json.dump(modes, fh)
        plugin.detach()
        del run, model, optimizer
        dist.barrier()  # no collective of this run left in flight when the next starts, or at exit


if __name__ == "__main__":
    main(sys.argv[1])
