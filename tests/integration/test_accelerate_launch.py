"""``accelerate launch --config_file`` runs ``rosa train`` on 2 CPU processes exactly as ``torchrun`` does.

The config file is the one docs/training.md shows. accelerate starts a ``distributed_type: MULTI_GPU``
run through ``torch.distributed.run``; on a machine without GPUs the processes train on the CPU over gloo,
as under ``torchrun`` (accelerate's ``MULTI_CPU`` type needs MPI to start more than one process per
machine). As in test_ddp.py: 2 ranks x micro-batch 1 x grad-accum 1 must give the masks and the adapter
of one process with grad-accum 2 (which test_ddp.py shows is what ``torchrun`` gives).
"""
import json
import sys

import pytest
import torch

from integration.test_ddp import _gloo_available, _masks, _run, _same_masks, cli_common_args

pytest.importorskip("accelerate", reason="accelerate is not installed")
pytestmark = [pytest.mark.slow,  # three process starts: ~1 min on 2 cores
              pytest.mark.skipif(not _gloo_available(), reason="torch.distributed with gloo is unavailable")]

ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
num_machines: 1
num_processes: 2
machine_rank: 0
main_process_port: 0
mixed_precision: 'no'
"""


@pytest.fixture(scope="module")
def launched(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("accelerate")
    common = cli_common_args(root, data_dir)
    (root / "accelerate.yaml").write_text(ACCELERATE_CONFIG)
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(root / "accelerate.yaml"),
          "-m", "rosa_peft.cli", "train", *common, "--grad-accum", "1", "--output-dir", str(root / "acc" / "out")],
         root / "acc")
    _run([sys.executable, "-m", "rosa_peft.cli", "train", *common, "--grad-accum", "2",
          "--output-dir", str(root / "single" / "out")], root / "single")
    return root


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_accelerate_launch_ran_two_processes_through_the_schedule(launched):
    acc, single = launched / "acc" / "out", launched / "single" / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "masks.safetensors", "run_config.json",
                 "metrics.jsonl"):
        assert (acc / name).is_file(), name
    records = _records(acc)
    assert [r["phase"] for r in records if r["event"] == "phase"] == ["warmup", "masks", "train"]  # rank 0 only
    assert json.loads((acc / "run_config.json").read_text())["global_steps"] == 3
    # two processes: each optimizer step read 2 examples (one per rank), as the single run's grad-accum 2 did
    epochs = [r["epoch"] for r in records if r.get("event") == "log" and "loss" in r and "epoch" in r]
    single_epochs = [r["epoch"] for r in _records(single) if r.get("event") == "log" and "loss" in r and "epoch" in r]
    assert epochs and epochs == single_epochs


def test_accelerate_launch_matches_one_process(launched):
    from safetensors.torch import load_file

    acc, single = launched / "acc" / "out", launched / "single" / "out"
    assert _same_masks(_masks(acc / "masks.safetensors"), _masks(single / "masks.safetensors"))
    a, b = load_file(str(acc / "adapter_model.safetensors")), load_file(str(single / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert any(k.endswith("rosa_spa.values") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
