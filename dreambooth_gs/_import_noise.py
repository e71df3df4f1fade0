"""Quiet three known third-party messages at import (imported first by the package)."""

import logging

# (logger, a fragment of the message it logs at import on every command)
KNOWN_NOISE = (
    # torchao 0.18 (for --base_model_precision) registers Enum constants the way torch 2.14 deprecates
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
    # diffusers 0.42 lists torchao tensor types that moved in torchao 0.18 (none that an int8 base of ours uses)
    ("diffusers.quantizers.torchao.torchao_quantizer", "torchao` Tensor"),
    # bitsandbytes 0.50 (imported by PEFT) looks for an optional CPU kernel package on AVX-512 machines
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class ImportNoise(logging.Filter):
    """Drops one logger's known import-time message (see :data:`KNOWN_NOISE`), nothing else."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


for logger_name, fragment in KNOWN_NOISE:
    logging.getLogger(logger_name).addFilter(ImportNoise(fragment))
