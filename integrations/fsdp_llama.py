"""Pretrain a Llama with LDFA under FSDP2 (``torch.distributed.fsdp.fully_shard``).

    torchrun --nproc_per_node 2 integrations/fsdp_llama.py --tiny                  # CPU, gloo
    torchrun --nproc_per_node 8 integrations/fsdp_llama.py --rule svd              # GPUs, nccl
    accelerate launch --config_file integrations/fsdp2.yaml \
        integrations/fsdp_llama.py --accelerate                                    # accelerate's FSDP2 (GPUs)
    python integrations/fsdp_llama.py --tiny                                       # one process

Every decoder layer and the root are sharded (FSDP2's usual layout); ``--wrap after``
wraps the already sharded model instead of wrapping first. What LDFA does under FSDP2
(README, "Large models"): the factors P, Q are small (r·(m+n) per layer) and replicated,
identical on every process; a rule that reads W works from the rows of W each process
holds (the svd descent sums a ∇P of m × r and a PᵀW of r × n across processes, the
calibrated re-aim an m × r product) and gathers one layer's full weight at a time only
for an SVD (attach and every ``refresh_every`` steps) and ``stats()``.

Checkpoints: the model and optimizer go through ``torch.distributed.checkpoint`` (each
process writes its shards); the plugin's state is replicated, so rank 0 writes it with
``save_pretrained`` and every process reads it back. ``--save-every`` / ``--resume``.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist

import ldfa_hf


def build(tiny: bool, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    # tiny: a vocabulary of 97 splits the head's rows unevenly (49 + 48), as real vocabularies do
    hidden, inter, layers, heads, vocab, seq = (32, 64, 2, 4, 97, 16) if tiny else (512, 1376, 8, 8, 8000, 256)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=seq)
    return LlamaForCausalLM(config), vocab, seq


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def batches(vocab: int, seq: int, global_batch: int, steps: int, seed: int):
    """The same global batches on every process; each process takes its contiguous slice."""
    g = torch.Generator().manual_seed(seed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per = global_batch // world
    for _ in range(steps):
        ids = torch.randint(0, vocab, (global_batch, seq), generator=g)
        yield ids[rank * per:(rank + 1) * per]


def checkpoint_state(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def save_checkpoint(path: str, model, optimizer, plugin, step: int) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save(checkpoint_state(model, optimizer), checkpoint_id=os.path.join(path, "shards"))
    if not dist.is_initialized() or dist.get_rank() == 0:
        plugin.save_pretrained(os.path.join(path, "ldfa"))  # replicated: one copy is the whole state
        with open(os.path.join(path, "step.txt"), "w") as fh:
            fh.write(str(step))
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: str, model, optimizer, plugin) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = checkpoint_state(model, optimizer)
    dcp.load(state, checkpoint_id=os.path.join(path, "shards"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    plugin.load_pretrained(os.path.join(path, "ldfa"))
    with open(os.path.join(path, "step.txt")) as fh:
        return int(fh.read())


def save_result(path: str, model, plugin) -> None:
    """Full weights (gathered to rank 0) and this process's factors."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    os.makedirs(path, exist_ok=True)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        save_file({k: v.clone().contiguous() for k, v in full.items()}, os.path.join(path, "weights.safetensors"))
    save_file({k: v.contiguous().cpu() for k, v in plugin.state_dict().items()}, os.path.join(path, f"factors_rank{rank}.safetensors"))


def held_megabytes(model, optimizer, plugin) -> dict:
    """What this process holds, in MiB: its shards of the weights and gradients, the optimizer
    state for them, and LDFA's factors (with their AdamW state)."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    def size(tensors):
        return sum(local(t).numel() * local(t).element_size() for t in tensors) / 2**20

    params = list(model.parameters())
    optim = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    ldfa = list(plugin.state_dict().values())
    return {"weights": size(params), "grads": size([p.grad for p in params if p.grad is not None]),
            "optimizer": size(optim), "ldfa": size(ldfa)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", default="svd")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--wrap", choices=["before", "after"], default="before", help="wrap before or after fully_shard")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--refresh-every", type=int, default=None)
    parser.add_argument("--calibrate-every", type=int, default=ldfa_hf.LDFAConfig.calibrate_every)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--save-every", type=int, default=None, help="checkpoint into --checkpoint every this many steps")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this step (to test resuming)")
    parser.add_argument("--save-dir", default=None, help="final weights and every process's factors")
    parser.add_argument("--accelerate", action="store_true", help="shard through accelerate (launch with its config)")
    parser.add_argument("--report-memory", action="store_true", help="print what each process holds after the run")
    args = parser.parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    accelerator = None
    if args.accelerate:  # accelerate's FSDP plugin (from the launch config) shards in prepare()
        from accelerate import Accelerator

        accelerator = Accelerator()
    elif distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    device = (accelerator.device if accelerator else
              torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    model, vocab, seq = build(args.tiny, args.seed)
    model.to(device)
    config = ldfa_hf.LDFAConfig(rule=args.rule, rank=args.rank, seed=args.seed,
                                refresh_every=args.refresh_every or args.steps // 2 or None,
                                calibrate_every=args.calibrate_every)
    if args.wrap == "before":
        plugin = ldfa_hf.wrap(model, config)  # LDFA
    if distributed and accelerator is None:
        shard(model)
    if args.wrap == "after" and accelerator is None:
        plugin = ldfa_hf.wrap(model, config)  # LDFA on the sharded model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
        if args.wrap == "after":
            plugin = ldfa_hf.wrap(model, config)
    start = load_checkpoint(args.checkpoint, model, optimizer, plugin) if args.resume else 0

    for step, ids in enumerate(batches(vocab, seq, args.global_batch, args.steps, args.seed), start=1):
        if step <= start:
            continue  # the data stream is replayed up to the checkpoint
        ids = ids.to(device)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss) if accelerator else loss.backward()
        optimizer.step()
        if args.report_memory and step == args.steps:
            held = held_megabytes(model, optimizer, plugin)
            print(f"rank {dist.get_rank() if distributed else 0} holds (MiB): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in held.items()), flush=True)
        optimizer.zero_grad(set_to_none=True)
        plugin.step()  # LDFA: after the optimizer step
        if args.save_every and step % args.save_every == 0:
            save_checkpoint(args.checkpoint, model, optimizer, plugin, step)
        if args.stop_after and step == args.stop_after:
            break
    if args.save_dir:
        save_result(args.save_dir, model, plugin)
    if not distributed or dist.get_rank() == 0:
        print(f"rule={args.rule} wrap={args.wrap} steps={step} loss={loss.item():.4f} {plugin}")
    if distributed:
        del model, optimizer, plugin  # FSDP2 keeps its last collectives' work objects until its state goes
        leave()


def leave() -> None:
    """End a multi-process run: the ranks meet, the group goes, and the process exits without the
    interpreter's teardown. Gloo's worker threads can abort that teardown on CPU now and then (SIGABRT,
    "terminate called without an active exception"; see pytorch/pytorch#179291) after everything has
    been saved, which a launcher reports as a failed run."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
