"""Size limits of a pipeline call, checked before anything is allocated.

A call that asks for more than a limit is refused with :class:`~diffstudio.errors.LimitExceededError`, whose
message names the limit, its value and both ways to raise it. The defaults are generous for real FLUX use and
small enough that a mistyped argument (``height=65536``, ``num_inference_steps=10**9``) fails in microseconds
instead of filling the memory:

==================================  =============================  ==================================
limit                               default                        environment variable
==================================  =============================  ==================================
``max_pixels`` (output image)       16,777,216 (4096 x 4096)       ``DIFFSTUDIO_MAX_PIXELS``
``max_input_pixels`` (each input)   33,554,432 (8192 x 4096)       ``DIFFSTUDIO_MAX_INPUT_PIXELS``
``max_steps``                       1000                           ``DIFFSTUDIO_MAX_STEPS``
``max_sequence_length`` (tokens)    4096                           ``DIFFSTUDIO_MAX_SEQUENCE_LENGTH``
``max_batch`` (images per call)     256                            ``DIFFSTUDIO_MAX_BATCH``
==================================  =============================  ==================================

Input images (``input_image``, ``edit_image``, ``kontext_images``, masks, any PIL image argument) are measured
by ``PIL.Image.size``, which a lazily opened file knows from its header, so an oversized file is refused
before its pixels are decoded.

Each pipeline reads the environment once, when it is created, into ``pipe.limits`` (a :class:`Limits`); set
an attribute to change one pipeline (``pipe.limits.max_pixels = 8192 * 8192``). An environment value must be
a positive integer (``_`` separators allowed); anything else is a :class:`~diffstudio.errors.ConfigError`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

from diffstudio.errors import ConfigError, LimitExceededError

#: Limit name -> environment variable that overrides its default.
ENV_VARS: dict[str, str] = {
    "max_pixels": "DIFFSTUDIO_MAX_PIXELS",
    "max_input_pixels": "DIFFSTUDIO_MAX_INPUT_PIXELS",
    "max_steps": "DIFFSTUDIO_MAX_STEPS",
    "max_sequence_length": "DIFFSTUDIO_MAX_SEQUENCE_LENGTH",
    "max_batch": "DIFFSTUDIO_MAX_BATCH",
}


@dataclass
class Limits:
    """The size limits of one pipeline (see the module docstring for defaults and overrides).

    Attributes:
        max_pixels: Largest ``height * width`` of a generated image.
        max_input_pixels: Largest ``width * height`` of each input image (checked before decoding).
        max_steps: Largest number of denoising steps (``num_inference_steps`` or ``len(sigmas)``).
        max_sequence_length: Largest text sequence length (``max_sequence_length``, ``t5_sequence_length``).
        max_batch: Largest number of images in one call (prompts x ``num_images_per_prompt``).
    """

    max_pixels: int = 4096 * 4096
    max_input_pixels: int = 8192 * 4096
    max_steps: int = 1000
    max_sequence_length: int = 4096
    max_batch: int = 256

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Limits:
        """The defaults, each replaced by its environment variable when that is set.

        Raises:
            ConfigError: A variable is set to something other than a positive integer.
        """
        env = os.environ if env is None else env
        limits = cls()
        for name, variable in ENV_VARS.items():
            raw = env.get(variable)
            if raw is None or not raw.strip():
                continue
            try:
                value = int(raw.strip())
            except ValueError:
                value = 0
            if value < 1:
                raise ConfigError(
                    f"{variable}={raw!r} is not a positive integer; set it to the new limit (e.g. "
                    f"{variable}={getattr(limits, name) * 4}) or unset it for the default {getattr(limits, name)}"
                )
            setattr(limits, name, value)
        return limits

    def check(self, name: str, value: int, what: str) -> None:
        """Raise :class:`LimitExceededError` when ``value`` exceeds the limit ``name``.

        Args:
            name: The limit (a field of this class).
            value: The requested amount.
            what: The argument(s) as the message shows them, e.g. ``"height x width = 65536 x 65536"``.
        """
        limit = getattr(self, name)
        if value > limit:
            raise LimitExceededError(
                f"{what} is {value:,}, above the limit {name}={limit:,}; if you really need it, raise the limit "
                f"with the environment variable {ENV_VARS[name]}=N or pipe.limits.{name} = N"
            )

    def as_dict(self) -> dict[str, int]:
        """``{limit name: value}``."""
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}
