"""RoSA under DDP: ``torchrun --nproc_per_node 2`` on CPU (gloo), tiny Llama, fp32, no dropout.

Checks that the mask statistics are all-reduced before selection (identical masks on both ranks, equal
to one process scoring all the micro-batches) and that the whole schedule (warm-up -> masks -> restart
-> LoRA + sparse) matches one process with the same global batch. With 2 ranks x micro-batch 2 x
grad-accum 2, the single-process reference keeps micro-batch 2 and takes grad-accum 4: each optimizer
step then sees the same 8 sequences, and the Fisher score squares the gradients of the same micro-batches.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama

TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"

SCRIPT = r'''
import json, os, sys
import torch
out, accum, tests = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.path.insert(0, tests)
from conftest import make_tiny_llama
from safetensors.torch import save_file
from transformers import TrainingArguments
from rosa_peft import RosaConfig, get_rosa_model
from rosa_peft.masks import compute_masks, save_masks
from rosa_peft.train import RosaTrainer, ScheduleConfig


class Data(torch.utils.data.Dataset):
    def __init__(self, n=24, seq=12):
        self.ids = torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


distributed = "LOCAL_RANK" in os.environ
args = TrainingArguments(
    output_dir=os.path.join(out, "ckpt"), max_steps=5, per_device_train_batch_size=2,
    gradient_accumulation_steps=accum, learning_rate=5e-3, warmup_steps=1, logging_steps=1, save_strategy="no",
    report_to=[], use_cpu=True, disable_tqdm=True, seed=3, data_seed=3, remove_unused_columns=False,
    ddp_backend="gloo" if distributed else None)
rank, world = args.process_index, args.world_size

# 1. compute_masks alone: each rank scores its own micro-batches (different data per rank)
g = torch.Generator().manual_seed(11)
batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (4, 2, 10), generator=g)]
mine = batches[rank::world]
probe = get_rosa_model(make_tiny_llama(0), RosaConfig(r=2, density=0.05, lora_dropout=0.0))
save_masks(compute_masks(probe, mine, progress=False), os.path.join(out, f"probe_sync{rank}.safetensors"))
save_masks(compute_masks(probe, mine, progress=False, sync=False), os.path.join(out, f"probe_local{rank}.safetensors"))

# 2. the whole schedule through RosaTrainer
model = get_rosa_model(make_tiny_llama(0), RosaConfig(r=2, density=0.05, lora_dropout=0.0))
phases = []
trainer = RosaTrainer(model=model, args=args, train_dataset=Data(), lora_lr=1e-2,
                      schedule=ScheduleConfig(mode="rosa", warmup_steps=2, seed=7),
                      phase_listener=lambda p, info: phases.append(p))
trainer.train()
save_masks(model.get_masks(), os.path.join(out, f"masks{rank}.safetensors"))
save_file({k: v.contiguous() for k, v in model.adapter_state_dict().items()}, os.path.join(out, f"adapter{rank}.safetensors"))
with open(os.path.join(out, f"info{rank}.json"), "w") as fh:
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    json.dump({"world": world, "phases": phases, "step": trainer.state.global_step, "backend": backend}, fh)
'''


def _gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


pytestmark = pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with the gloo backend is unavailable")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, out: Path):
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(SRC), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    script = root / "ddp_script.py"
    script.write_text(SCRIPT)
    _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script),
          str(root / "ddp"), "2", str(TESTS)], root / "ddp")
    _run([sys.executable, str(script), str(root / "single"), "4", str(TESTS)], root / "single")
    return root


def _masks(path):
    from rosa_peft.masks import load_masks

    return load_masks(str(path))


def _same_masks(a, b) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_ran_two_gloo_ranks_through_the_schedule(runs):
    for rank in (0, 1):
        info = json.loads((runs / "ddp" / f"info{rank}.json").read_text())
        assert info == {"world": 2, "phases": ["warmup", "masks", "train"], "step": 5, "backend": "gloo"}
    single = json.loads((runs / "single" / "info0.json").read_text())
    assert single["world"] == 1 and single["step"] == 5


def test_compute_masks_all_reduces_scores_before_selection(runs):
    from rosa_peft import RosaConfig, get_rosa_model
    from rosa_peft.masks import compute_masks

    s0, s1 = _masks(runs / "ddp" / "probe_sync0.safetensors"), _masks(runs / "ddp" / "probe_sync1.safetensors")
    assert _same_masks(s0, s1)
    # ... and they are the masks of one process scoring all four micro-batches
    g = torch.Generator().manual_seed(11)
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (4, 2, 10), generator=g)]
    ref = compute_masks(get_rosa_model(make_tiny_llama(0), RosaConfig(r=2, density=0.05, lora_dropout=0.0)),
                        [batches[0], batches[2], batches[1], batches[3]], progress=False)
    assert _same_masks(s0, ref)
    # without the exchange each rank would pick from its own data (so the check above has teeth)
    l0, l1 = _masks(runs / "ddp" / "probe_local0.safetensors"), _masks(runs / "ddp" / "probe_local1.safetensors")
    assert not _same_masks(l0, l1)


def test_ddp_training_matches_single_process_with_the_same_global_batch(runs):
    from safetensors.torch import load_file

    m0, m1 = _masks(runs / "ddp" / "masks0.safetensors"), _masks(runs / "ddp" / "masks1.safetensors")
    ms = _masks(runs / "single" / "masks0.safetensors")
    assert _same_masks(m0, m1)
    assert _same_masks(m0, ms)
    a0, a1 = load_file(str(runs / "ddp" / "adapter0.safetensors")), load_file(str(runs / "ddp" / "adapter1.safetensors"))
    ref = load_file(str(runs / "single" / "adapter0.safetensors"))
    assert a0.keys() == a1.keys() == ref.keys()
    assert any(k.endswith("rosa_spa.values") for k in a0) and any(k.endswith("lora_B.weight") for k in a0)
    for k in a0:
        assert torch.equal(a0[k], a1[k]), k  # DDP keeps the replicas identical (sparse values included)
        torch.testing.assert_close(a0[k], ref[k], rtol=0, atol=1e-5, msg=k)
        if k.endswith(("rosa_spa.values", "lora_B.weight")):
            assert a0[k].abs().sum() > 0, k  # they actually trained


# ---- `rosa train` itself under torchrun (a tiny Llama with SmolLM2's tokenizer, ViGGO) -------------
CLI_ARGS = ["--task", "viggo", "--limit", "8", "--max-seq-len", "256", "--batch-size", "1", "--warmup-steps", "1",
            "--lr-warmup-steps", "1", "--max-steps", "3", "--density", "0.01", "--lora-dropout", "0",
            "--seed", "5", "--no-progress"]  # r comes from --config: torchrun's parser calls "--r" ambiguous


def cli_common_args(root, data_dir) -> list:
    """A tiny Llama with SmolLM2's tokenizer saved under ``root/model`` and an r=2 config file; the
    ``rosa train`` arguments every launcher's run shares (skips when the embedded model is missing)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rosa_peft.utils.model_loading import resolve_model_path

    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(None))
    except Exception as exc:  # noqa: BLE001 - the embedded model is not installed
        pytest.skip(f"embedded SmolLM2 tokenizer unavailable: {exc}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "config.yaml").write_text("r: 2\n")
    return ["--model", str(root / "model"), "--data-dir", str(data_dir), "--config", str(root / "config.yaml"),
            *CLI_ARGS]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("ddp_cli")
    common = cli_common_args(root, data_dir)
    _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
          "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "rosa_peft.cli", "train",
          *common, "--grad-accum", "1", "--output-dir", str(root / "ddp" / "out")], root / "ddp")
    _run([sys.executable, "-m", "rosa_peft.cli", "train", *common, "--grad-accum", "2",
          "--output-dir", str(root / "single" / "out")], root / "single")
    return root


def test_rosa_train_under_torchrun_matches_one_process(cli_runs):
    from safetensors.torch import load_file

    ddp, single = cli_runs / "ddp" / "out", cli_runs / "single" / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "masks.safetensors", "run_config.json",
                 "metrics.jsonl", "loss.png"):
        assert (ddp / name).is_file(), name
    records = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records if r["event"] == "phase"] == ["warmup", "masks", "train"]  # rank 0 only
    assert json.loads((ddp / "run_config.json").read_text())["global_steps"] == 3
    assert _same_masks(_masks(ddp / "masks.safetensors"), _masks(single / "masks.safetensors"))
    a, b = load_file(str(ddp / "adapter_model.safetensors")), load_file(str(single / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
