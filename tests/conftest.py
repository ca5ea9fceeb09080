import os

# Hub calls must fail fast, never retry for half a minute (the README's test command sets this too). Set before
# anything imports huggingface_hub (timm does), which reads it once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from gat_tutorial.recipe import train_two_ranks_then_sigterm_rank_1  # noqa: E402, F401 (the tests import it from here)


SMALL_TEACHER = "vit_small_patch14_dinov2"  # DINOv2 ViT-S/14: the code path of GAT's B/14, four times cheaper


@pytest.fixture(scope="session")
def teacher_file(tmp_path_factory):
    "Randomly initialised DINOv2 weights in a local file, as a user without the hub would pass them."
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "dinov2_s.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(SMALL_TEACHER).state_dict().items()}, path)
    return path
