"""RoSA under FSDP2 (``torch.distributed.fsdp.fully_shard``): ``torchrun --nproc_per_node 2`` on CPU (gloo).

A tiny Llama with a RoSA adapter (identical masks on both ranks, chosen from a shared seed) is switched
to ``impl="sp_add"`` and sharded per decoder layer and at the root; each rank takes half of a batch. The
mean loss, every trainable gradient and the parameters after one AdamW step equal one unsharded process on
the whole batch; ``save_pretrained`` gathers the sharded adapter on every rank and writes it once, and the
file reloads into a plain model with the same logits. Left in ``merged``, the sharded model refuses to run
(``merged`` writes into the weight FSDP shards) instead of computing wrong gradients. Mask scoring
(``compute_masks``) on the sharded model, each rank on its half, gives the masks of one process on both
halves; installing them there is refused (FSDP owns the values' Parameter and would swap a new one out at
every forward, so the sparse part would silently neither run nor train) and changes nothing.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"

SCRIPT = r'''
import copy, json, os, sys
import torch
import torch.distributed as dist
out, tests = sys.argv[1], sys.argv[2]
sys.path.insert(0, tests)
from conftest import make_tiny_llama
from rosa_peft import RosaConfig, RosaModel, get_rosa_model
from rosa_peft.masks import compute_masks
from torch.distributed.fsdp import fully_shard

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)


def build(masks=True, **kw):
    model = get_rosa_model(make_tiny_llama(0), RosaConfig(r=2, density=0.05, lora_dropout=0.0,
                                                           init_lora_weights=False, **kw))
    if masks:
        g = torch.Generator().manual_seed(5)
        model.set_masks({n: torch.rand(l.out_features, l.in_features, generator=g) < 0.05
                         for n, l in model.rosa_layers()})
    return model


ids = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(1))
reference = build()
ref_loss = reference(input_ids=ids, labels=ids).loss
ref_loss.backward()
ref_grads = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}
ref_opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2)
ref_opt.step()

info = {"rank": rank, "world": world}
merged = build()
for layer in merged.model.model.layers:
    fully_shard(layer)
fully_shard(merged)
try:
    merged(input_ids=ids[:2], labels=ids[:2])
    info["merged_error"] = None
except RuntimeError as exc:
    info["merged_error"] = str(exc)

model = build()
model.set_impl("sp_add")
for layer in model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
half = ids.shape[0] // world
mine = ids[rank * half:(rank + 1) * half]
loss = model(input_ids=mine, labels=mine).loss
loss.backward()
mean = loss.detach().clone()
dist.all_reduce(mean)
info["loss"], info["ref_loss"] = float(mean) / world, float(ref_loss)
info["grad_diff"] = max(float((p.grad.full_tensor() - ref_grads[n]).abs().max())
                        for n, p in model.named_parameters() if p.requires_grad)
info["n_grads"] = sum(1 for p in model.parameters() if p.requires_grad)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
opt.step()
ref_params = dict(reference.named_parameters())
info["param_diff"] = max(float((p.full_tensor() - ref_params[n]).abs().max())
                         for n, p in model.named_parameters() if p.requires_grad)
model.save_pretrained(os.path.join(out, "adapter"), is_main_process=rank == 0)

# mask scoring on a sharded model: each rank scores its half, the statistics are summed over the ranks
halves = [{"input_ids": ids[i * half:(i + 1) * half], "labels": ids[i * half:(i + 1) * half]} for i in range(world)]
ref_masks = compute_masks(build(masks=False), halves, criterion="fisher", progress=False)
scored = build(masks=False, impl="sp_add")
for layer in scored.model.model.layers:
    fully_shard(layer)
fully_shard(scored)
masks = compute_masks(scored, [halves[rank]], criterion="fisher", progress=False)
info["masks_equal"] = masks.keys() == ref_masks.keys() and all(torch.equal(masks[k], ref_masks[k]) for k in masks)
info["mask_entries"] = sum(int(m.sum()) for m in masks.values())
try:  # FSDP owns the (empty) values Parameter: a new one would be swapped out at every forward
    scored.set_masks(masks)
    info["set_masks_error"] = None
except RuntimeError as exc:
    info["set_masks_error"] = str(exc)
info["values_after_refusal"] = sum(int(l.rosa_spa["default"].nnz) for _, l in scored.rosa_layers())
dist.barrier()
if rank == 0:
    loaded = RosaModel.from_pretrained(make_tiny_llama(0), os.path.join(out, "adapter"))
    with torch.no_grad():
        info["reload_diff"] = float((loaded(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max())
with open(os.path.join(out, f"info{rank}.json"), "w") as fh:
    json.dump(info, fh)
dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def infos(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp")
    import torch.distributed as dist

    if not dist.is_available() or not hasattr(__import__("torch.distributed.fsdp", fromlist=["x"]), "fully_shard"):
        pytest.skip("this PyTorch build has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    root = tmp_path_factory.mktemp("fsdp2")
    script = root / "fsdp_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(root), str(TESTS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((root / f"info{r}.json").read_text()) for r in (0, 1)]


def test_merged_refuses_a_sharded_weight(infos):
    for info in infos:
        assert info["merged_error"] and "set_impl('sp_add')" in info["merged_error"]


def test_sp_add_under_fsdp2_matches_one_process(infos):
    for info in infos:
        assert info["world"] == 2 and info["n_grads"] > 0
        assert abs(info["loss"] - info["ref_loss"]) < 1e-5
        assert info["grad_diff"] < 1e-5
        assert info["param_diff"] < 1e-5


def test_adapter_saved_once_from_the_sharded_model_reloads(infos):
    assert infos[0]["reload_diff"] < 1e-5


def test_masks_scored_on_the_sharded_model_equal_one_process_and_are_not_installed_there(infos):
    for info in infos:
        assert info["masks_equal"] and info["mask_entries"] > 0, info
        msg = info["set_masks_error"]
        assert msg and msg.startswith("model.layers.0.") and "sharded with FSDP2" in msg and "fully_shard" in msg, msg
        assert "\n" not in msg
        assert info["values_after_refusal"] == 0, info
