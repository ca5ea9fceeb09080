"The ancestors of GAT: ViTGAN and TransGAN (lessons 07, 08)."
