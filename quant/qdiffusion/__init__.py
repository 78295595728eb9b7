"""Q-Diffusion (Li et al., ICCV 2023): timestep-aware post-training quantization of diffusion UNets.

- ``quantizers``: the weight, activation and AdaRound quantizers;
- ``modules``: the quantized layers, the attention processor, and the function that puts them into a UNet;
- ``calibration``: the recording of UNet inputs along sampling runs;
- ``reconstruct``: the block reconstruction;
- ``artefact``: the file a calibrated model is saved in;
- ``int8``: real int8 kernels for W8A8 layers on the CPU.
"""
