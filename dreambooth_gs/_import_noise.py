"""Quiet two known third-party messages at import (imported first by the package)."""

import logging


class ImportNoise(logging.Filter):
    """Two messages that torchao 0.18 (installed for --base_model_precision) makes torch 2.14 and diffusers 0.42 log
    at import, on every command, about their own internals: torch's deprecation of a registration torchao does, and
    diffusers' list of torchao tensor types that moved (types no adapter or int8 base of ours uses)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("is an Enum subclass and is now natively supported" in message or "torchao` Tensor" in message)


for logger_name in ("torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(logger_name).addFilter(ImportNoise())
