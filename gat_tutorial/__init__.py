"""Learn and train transformer GANs (GAT, TransGAN, ViTGAN, R3GAN) from nbdev notebooks

Modules:

- `gat_tutorial.train`: One loop for every model family — pixels or latents, one D step and one G step per iteration — from a laptop CPU to `torchrun` on 8 GPUs; then the first GANs of the course, ViTGAN and TransGAN, trained on the digits."""

__version__ = "0.0.1"
