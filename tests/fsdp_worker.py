"""Worker for test_distributed.py (run under torchrun, gloo): shard a tiny preset with torch FSDP2 along
its ``_no_split_modules``, train a few SGD steps (linear in the gradients, so the comparison with one
process is sharp) with each rank on its half of every batch, then gather the full state dict and save it
with ``save_pretrained`` from rank 0."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

import hf_memory
from hf_memory.tasks import MQARSpec, mqar_batch

preset, steps, output = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(hf_memory.get_config(preset, attn_implementation="eager"))
for module in model.modules():
    if type(module).__name__ in model._no_split_modules:
        fully_shard(module)
fully_shard(model)
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
generator = torch.Generator().manual_seed(1)
spec = MQARSpec(vocab_size=model.config.vocab_size, num_pairs=4, num_queries=4)
losses = []
for _ in range(steps):
    batch = mqar_batch(spec, 16, generator)
    loss = model(**{k: v[rank::world] for k, v in batch.items()}, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(hf_memory.get_config(preset))
    plain.load_state_dict(state)
    plain.save_pretrained(output)
    json.dump({"sharded": type(model).__name__, "losses": losses}, open(f"{output}/losses.json", "w"))
# Rank 1 tearing gloo down while rank 0 still saves aborted it once in CI ("terminate called without an active
# exception", SIGABRT after the shards were written): both ranks leave together.
dist.barrier()
dist.destroy_process_group()
