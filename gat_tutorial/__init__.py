"""Learn and train transformer GANs (GAT, TransGAN, ViTGAN, R3GAN) from nbdev notebooks

Modules:

- `gat_tutorial.train`: One D step and one G step per iteration, in a VAE latent space, with MNG, DiffAugment, finite-difference R1/R2, the width-aware learning rate and EMA — from a laptop CPU to `torchrun` on 8 GPUs."""

__version__ = "0.0.1"
