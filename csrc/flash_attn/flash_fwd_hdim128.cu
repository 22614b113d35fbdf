// Flash attention forward kernels for head dim 128 (fp16 and bf16): one file per head dim so
// that the build compiles them in parallel.
#include "flash_attn/flash_fwd_kernel.cuh"

XO_FLASH_FWD_INSTANTIATE(128)
