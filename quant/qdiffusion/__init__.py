"""Q-Diffusion (Li et al., ICCV 2023): timestep-aware post-training quantization of diffusion UNets.

``quantizers`` holds the weight, activation and AdaRound quantizers; ``modules`` the quantized
layers and attention processor and the function that puts them into a UNet; ``calibration`` the
recording of UNet inputs along sampling runs; ``reconstruct`` the block reconstruction; and
``artefact`` the file a calibrated model is saved in.
"""
