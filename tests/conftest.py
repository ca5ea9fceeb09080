import os, signal, subprocess, sys, time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

# Hub calls must fail fast, never retry for half a minute (the README's test command sets this too).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


SMALL_TEACHER = "vit_small_patch14_dinov2"  # DINOv2 ViT-S/14: the code path of GAT's B/14, four times cheaper


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    "Randomly initialised DINOv2 weights in a local file, as a user without the hub would pass them."
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "dinov2_s.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(SMALL_TEACHER).state_dict().items()}, path)
    return path


def rank_pid(parent: int, rank: int) -> int:
    "The pid of torchrun's worker of the given rank, found among parent's children by its RANK variable."
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent: continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError): continue
        if f"RANK={rank}".encode() in env: return int(stat.parent.name)
    raise AssertionError(f"no worker of rank {rank} under pid {parent}")


def train_two_ranks_then_sigterm_rank_1(args, out, timeout=300) -> tuple:
    "Start gat-train on 2 ranks under torchrun, wait for two loss records in out, SIGTERM rank 1 only; (returncode, stdout, stderr)."
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "gat_tutorial.train", *args, "--out", str(out), "--steps", "100000", "--log_every", "1",
                          "--sample_every", "100000", "--eval_samples", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics, deadline = Path(out) / "metrics.jsonl", time.time() + timeout
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.2)
    os.kill(rank_pid(p.pid, 1), signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=timeout)
    return p.returncode, stdout, stderr
