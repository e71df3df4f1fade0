"""GSOFTConfig: what an adapter is (method, block structure, targets), validated, and its JSON forms.

It is a PEFT config (``peft.PeftConfig``, peft type ``GSOFT``), so ``peft.get_peft_model(model, GSOFTConfig(...))``
and diffusers' ``add_adapter`` take it (the tuner that builds the layers is registered by
:mod:`dreambooth_gs.methods.peft_gs`). Two JSON forms: :meth:`GSOFTConfig.adapter_dict` is the ``config`` section
of this toolkit's adapter folders (the GS fields only, unchanged since format 1); ``to_dict`` is PEFT's (every
field, with ``peft_type``), which PEFT's own ``save_pretrained`` / ``from_pretrained`` write and read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from peft import PeftConfig
from peft.utils.peft_types import PeftType

METHODS = ("gsoft", "double_gsoft", "boft")
PARAMETRIZATIONS = ("cayley", "cayley_neumann", "exp")
FORWARD_MODES = ("auto", "activation", "weight")
DEFAULT_NBLOCKS = 32
DEFAULT_BOFT_FACTORS = 4  # the paper's BOFT (32 blocks, 4 factors) row of Table 2


PEFT_TYPE = "GSOFT"


def gsoft_peft_type() -> PeftType:
    """PEFT's ``PeftType.GSOFT``, added to its enum on first use (PEFT's enum is closed: an out-of-tree method has to
    add its member before ``register_peft_method`` accepts it; nothing of PEFT's files is edited)."""
    if PEFT_TYPE not in PeftType.__members__:
        member = str.__new__(PeftType, PEFT_TYPE)
        member._name_ = member._value_ = PEFT_TYPE
        type.__setattr__(PeftType, PEFT_TYPE, member)
        PeftType._member_map_[PEFT_TYPE] = member
        PeftType._value2member_map_[PEFT_TYPE] = member
        PeftType._member_names_.append(PEFT_TYPE)
    return PeftType[PEFT_TYPE]


def divisors(n: int) -> list[int]:
    """Every positive divisor of ``n``, ascending: the valid block counts (or block sizes) for a dimension."""
    return [k for k in range(1, n + 1) if n % k == 0]


def is_target(module_name: str, target_modules: Sequence[str]) -> bool:
    """A dotted module name matches a target when it equals it or ends with '.' + target."""
    return any(module_name == t or module_name.endswith("." + t) for t in target_modules)


def target_module_names(
    target_modules: str | Sequence[str], field_name: str = "target_modules", allow_none: bool = False
) -> tuple[str, ...]:
    """``target_modules`` as a tuple of names (one name may be given as a string); refuses empty names, and an
    empty list unless ``allow_none``."""
    names = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    if (not names and not allow_none) or not all(isinstance(t, str) and t for t in names):
        raise ValueError(f"{field_name} must be non-empty module names, got {names!r}")
    return names


@dataclass
class GSOFTConfig(PeftConfig):
    """Configuration of a GSOFT / Double GSOFT / BOFT adapter; ``adapter_dict`` / ``from_dict`` round-trip it."""

    FORMAT_VERSION: ClassVar[int] = 1

    method: str = field(
        default="gsoft",
        metadata={
            "help": "'gsoft': y = s * (W Q x) + bias with a GS orthogonal Q on the input; 'double_gsoft': "
            "y = s * (Q_out W Q_in x) + bias; 'boft': BOFT's butterfly orthogonal matrix on the input, built on "
            "the same GS core (any device, every butterfly factor)."
        },
    )
    nblocks: int | None = field(
        default=None,
        metadata={
            "help": "Number of blocks r of each block-diagonal factor (every adapted dimension d must be divisible "
            f"by r; block size b = d / r). Give this or block_size, not both; default {DEFAULT_NBLOCKS}."
        },
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "Block size b of each factor instead of nblocks (then r = d / b per dimension)."},
    )
    n_butterfly_factor: int | None = field(
        default=None,
        metadata={
            "help": "BOFT only: number of butterfly factors m (PEFT's boft_n_butterfly_factor); "
            f"default {DEFAULT_BOFT_FACTORS}. m = 1 is OFT's single block-diagonal factor."
        },
    )
    target_modules: tuple[str, ...] = field(
        default=("to_q", "to_k", "to_v", "to_out.0"),
        metadata={
            "help": "nn.Linear modules to adapt: a module is adapted when its dotted name equals a target or ends "
            "with '.' + target. The default is every attention projection of a diffusers UNet."
        },
    )
    scale: bool = field(
        default=True,
        metadata={"help": "Train a per-output scale vector s (initialised to ones) next to the rotation."},
    )
    parametrization: str = field(
        default="cayley",
        metadata={
            "help": "How blocks become orthogonal: 'cayley' (I + K)(I - K)^-1, exact; 'cayley_neumann' the same with "
            "(I - K)^-1 truncated to I + K + K^2 + K^3 (PEFT OFT's default 5-term series: matmuls only, "
            "orthogonal up to 2 |K|^4); or 'exp' (matrix exponential)."
        },
    )
    forward_mode: str = field(
        default="auto",
        metadata={
            "help": "Where the training forward applies Q: 'activation', 'weight' or 'auto' (the cheaper one for "
            "each layer's shapes). Changes speed only, never results."
        },
    )
    weight_side_modules: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Modules (matched like target_modules) that train on the weight side when forward_mode is "
            "'auto': their backward keeps only the input. For projections whose output nothing downstream keeps "
            "(a UNet's to_out.0 feeds the residual sum), the activation side's kept output is extra memory; the "
            "weight side avoids it for one weight-sized matmul. Changes speed and memory only, never results."
        },
    )

    # What PEFT's tuner reads of every config; GS adapters always name their targets and adapt nothing else.
    exclude_modules: tuple[str, ...] | None = field(default=None, metadata={"help": "PEFT: modules never adapted."})
    target_parameters: None = field(default=None, metadata={"help": "PEFT: unused by GS adapters."})
    modules_to_save: None = field(default=None, metadata={"help": "PEFT: unused by GS adapters."})
    layers_to_transform: None = field(default=None, metadata={"help": "PEFT: unused by GS adapters."})
    layers_pattern: None = field(default=None, metadata={"help": "PEFT: unused by GS adapters."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = gsoft_peft_type()
        self.target_modules = target_module_names(self.target_modules)
        self.weight_side_modules = target_module_names(self.weight_side_modules, "weight_side_modules", allow_none=True)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.nblocks is not None and self.block_size is not None:
            raise ValueError(
                f"give nblocks or block_size, not both (got nblocks={self.nblocks}, block_size={self.block_size})"
            )
        if self.nblocks is None and self.block_size is None:
            self.nblocks = DEFAULT_NBLOCKS
        for name in ("nblocks", "block_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.method == "boft":
            if self.n_butterfly_factor is None:
                self.n_butterfly_factor = DEFAULT_BOFT_FACTORS
            m = self.n_butterfly_factor
            if not isinstance(m, int) or isinstance(m, bool) or m < 1:
                raise ValueError(f"n_butterfly_factor must be a positive integer, got {m!r}")
            if m > 1 and self.nblocks is not None and (self.nblocks % 2 ** (m - 1) or m - 1 > math.log2(self.nblocks)):
                raise ValueError(
                    f"BOFT with n_butterfly_factor={m} needs nblocks divisible by 2**{m - 1}={2 ** (m - 1)}; "
                    f"got nblocks={self.nblocks} (use nblocks={2 ** (m - 1)}, {2**m}, ... or fewer factors)"
                )
            if m > 1 and self.block_size is not None and self.block_size % 2:
                raise ValueError(f"BOFT with several butterfly factors needs an even block_size, got {self.block_size}")
        elif self.n_butterfly_factor is not None:
            raise ValueError(f"n_butterfly_factor only applies to method='boft', not {self.method!r}")
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(
                f"unknown parametrization {self.parametrization!r}; choose one of {', '.join(PARAMETRIZATIONS)}"
            )
        if self.forward_mode not in FORWARD_MODES:
            raise ValueError(f"unknown forward_mode {self.forward_mode!r}; choose one of {', '.join(FORWARD_MODES)}")

    def blocks_for(self, dim: int) -> int | None:
        """Block count r for a dimension of size ``dim``, or None when the configuration does not divide it."""
        if self.nblocks is not None:
            return self.nblocks if dim % self.nblocks == 0 else None
        return dim // self.block_size if dim % self.block_size == 0 else None

    def adapter_dict(self) -> dict[str, Any]:
        """The ``config`` section of an adapter folder: the GS fields only (format 1)."""
        data = {name: getattr(self, name) for name in ADAPTER_FIELDS}
        data["target_modules"] = list(self.target_modules)
        data["weight_side_modules"] = list(self.weight_side_modules)
        return data

    def to_dict(self) -> dict[str, Any]:
        """PEFT's form: every field, ``peft_type`` included (what ``PeftConfig.save_pretrained`` writes)."""
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["weight_side_modules"] = list(self.weight_side_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GSOFTConfig:
        """A config from :meth:`adapter_dict`'s form (an adapter folder's ``config`` section); refuses unknown
        fields."""
        unknown = sorted(set(data) - set(ADAPTER_FIELDS))
        if unknown:
            raise ValueError(f"unknown GSOFTConfig fields {unknown}; known fields: {sorted(ADAPTER_FIELDS)}")
        return cls(**data)


# The fields of an adapter folder's config section (format 1): the GS fields, not PEFT's own or those PEFT's tuner
# reads (PEFT_TUNER_FIELDS, declared last in the class).
PEFT_TUNER_FIELDS = ("exclude_modules", "target_parameters", "modules_to_save", "layers_to_transform", "layers_pattern")
ADAPTER_FIELDS = tuple(
    f.name for f in fields(GSOFTConfig) if f.name not in {g.name for g in fields(PeftConfig)} | set(PEFT_TUNER_FIELDS)
)
