"REPA with GAT's own teacher, DINOv2-B/14, randomly initialised and loaded from a file as a user without the hub would."
import timm
import torch
from safetensors.torch import save_file

from gat_tutorial.repa import DINOV2_B, TEACHER_SIZE, load_teacher, repa_loss, teacher_input, teacher_targets


def test_dinov2_b_from_a_file_gives_targets_on_every_d_grid(tmp_path):
    torch.manual_seed(0)
    native = timm.create_model(DINOV2_B)                                   # 518 px, as the released weights
    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, tmp_path / "dinov2_b.safetensors")
    teacher = load_teacher(DINOV2_B, tmp_path / "dinov2_b.safetensors")
    assert teacher.embed_dim == 768 and teacher.pos_embed.shape == (1, 1 + (TEACHER_SIZE // 14) ** 2, 768)
    x = teacher_input(torch.rand(2, 3, 256, 256) * 2 - 1)
    for grid in (16, 8, 4):                                                # GAT-*/2, /4, /8 at 256 px
        cls, patches = teacher_targets(teacher, x, grid)
        assert cls.shape == (2, 768) and patches.shape == (2, grid * grid, 768)
    cls, patches = teacher_targets(teacher, x, 16)
    assert torch.allclose(repa_loss((cls, patches), (cls, patches)), torch.zeros(2), atol=1e-5)
    assert native.pos_embed.shape[1] == 1 + 37 * 37                        # loaded from a 518-px file: resampled
    assert torch.equal(teacher.blocks[-1].mlp.fc2.weight, native.blocks[-1].mlp.fc2.weight)
