// placeholder: MoE routing kernels are being written
