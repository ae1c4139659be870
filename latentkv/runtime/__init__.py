"""The MLA runtime: the attention module (expanded and absorbed paths), the latent cache, module
installation into HF decoder models, native checkpoints, and generation."""
