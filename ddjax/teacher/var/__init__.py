"""VAR (next-scale prediction, FoundationVision/VAR) as a teacher family.

    from ddjax.teacher import var
    vae_cfg, var_cfg = var.vqvae_config(), var.var_config(16)
    vae = var.load_vqvae("vae_ch160v4096z32.pth", vae_cfg)
    params = var.load_var("var_d16.pth", var_cfg)
    ids = var.sample(params, var_cfg, vae, vae_cfg, labels, key,
                     var.VARSamplingSettings(cfg=1.5, top_k=900, top_p=0.96))   # [B, 680]
    images = var.ids_to_image(vae, vae_cfg, ids)                             # [B, 256, 256, 3]
"""

from ddjax.teacher.var.loading import (
    export_var,
    export_vqvae,
    load_var,
    load_vqvae,
    var_state_dict,
    vqvae_state_dict,
)
from ddjax.teacher.var.model import DEPTHS, VAR, VARConfig, init_cache, param_count, var_config
from ddjax.teacher.var.sampling import (
    SampleTrace,
    VARSamplingSettings,
    filter_top_k_top_p,
    greedy_rule,
    ids_to_image,
    multinomial_rule,
    sample,
)
from ddjax.teacher.var.vqvae import (
    VQVAE,
    VQVAEConfig,
    fhat_to_img,
    idxBl_to_fhat,
    idxBl_to_img,
    idxBl_to_var_input,
    img_to_idxBl,
    vqvae_config,
)

__all__ = [
    "DEPTHS", "VAR", "VARConfig", "VQVAE", "VQVAEConfig", "SampleTrace", "VARSamplingSettings",
    "export_var", "export_vqvae", "fhat_to_img", "filter_top_k_top_p", "greedy_rule",
    "idxBl_to_fhat", "idxBl_to_img", "idxBl_to_var_input", "ids_to_image", "img_to_idxBl",
    "init_cache", "load_var", "load_vqvae", "multinomial_rule", "param_count", "sample",
    "var_config", "var_state_dict", "vqvae_config", "vqvae_state_dict",
]
