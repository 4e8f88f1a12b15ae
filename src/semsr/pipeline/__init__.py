"""semsr.pipeline: the diffusion SR core shared by every recipe.

- :mod:`.options`: the options every latent SR method shares (sampling, SD base, ControlNet);
- :mod:`.text`: prompts -> ``(B, 77, D)`` context (CLIP, or offline MiniLM + projection);
- :mod:`.guidance`: guidance as denoiser wrappers (classifier-free, weighted branches);
- :mod:`.sampler`: the denoising loop over a diffusers scheduler (no guidance inside);
- :mod:`.latent_tiling`: Gaussian-blended latent tiles, tiled VAE;
- :mod:`.colorfix`: adain | wavelet | none;
- :mod:`.latent_sr`: the layout / sampling / decoding steps every SD latent SR pipeline shares;
- :mod:`.sd_controlnet`: the SD + SR ControlNet pipeline and the per-step ControlNet + UNet call;
- :mod:`.single_file`: export to the original single-file (LDM) layout;
- :mod:`.sd_configs`: SD-1.5 architecture configs as code;
- :mod:`.precision`: channels-last / compile settings;
- :mod:`.tiling`: pixel-space tiling of any method.

Local-only loading of SD folders, single files and ControlNets is :mod:`semsr.core.loading`.
"""
