"""semsr.pipeline: the diffusion SR core shared by every recipe.

- :mod:`.loading`: local-only loading (SD folders, single files, ControlNets, project checkpoints);
- :mod:`.text`: prompts -> ``(B, 77, D)`` context (CLIP, or offline MiniLM + projection);
- :mod:`.sampler`: the denoising loop over a diffusers scheduler, with CFG;
- :mod:`.latent_tiling`: Gaussian-blended latent tiles, tiled VAE;
- :mod:`.colorfix`: adain | wavelet | none;
- :mod:`.latent_sr`: the layout / sampling / decoding steps every SD latent SR pipeline shares;
- :mod:`.sd_controlnet`: the SD + SR ControlNet pipeline and the ``sd-controlnet`` method;
- :mod:`.single_file`: export to the original single-file (LDM) layout;
- :mod:`.sd_configs`: SD-1.5 architecture configs as code;
- :mod:`.precision`: dtype / channels-last / compile settings;
- :mod:`.tiling`: pixel-space tiling of any method.
"""
