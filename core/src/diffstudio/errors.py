"""Typed errors raised by diffstudio.

Every error says what was wrong and what to do about it. Catch :class:`DiffstudioError` to catch them all;
the subclasses exist so callers (and tests) can tell the cases apart.
"""

from __future__ import annotations

from collections.abc import Sequence


class DiffstudioError(Exception):
    """Base class of every error diffstudio raises on purpose."""


# --------------------------------------------------------------------------------------------------------------
# plugins
# --------------------------------------------------------------------------------------------------------------


class PluginError(DiffstudioError):
    """A plugin could not be loaded, or plugins disagree."""


class PluginLoadError(PluginError):
    """A plugin failed to import or declares an incompatible requirement (fatal under strict mode)."""


class DuplicateRegistrationError(PluginError):
    """Two plugins registered the same name in one registry."""


class MissingPluginError(PluginError):
    """An input or model needs a plugin distribution that is not installed."""

    def __init__(self, what: str, distribution: str) -> None:
        super().__init__(
            f"{what} needs the plugin distribution {distribution!r}, which is not installed. "
            f"Install it with `pip install {distribution}` and check `diffstudio plugins`."
        )
        self.distribution = distribution


# --------------------------------------------------------------------------------------------------------------
# files and checkpoints
# --------------------------------------------------------------------------------------------------------------


class CheckpointError(DiffstudioError):
    """A checkpoint file or folder cannot be read."""


class SafetensorsFormatError(CheckpointError):
    """A safetensors file violates the format (header size, JSON, offsets, sizes, coverage)."""


class PickleRefusedError(CheckpointError):
    """A pickle-based checkpoint (.bin/.pt/.ckpt/.pth) was given without the explicit opt-in."""


class UnknownCheckpointError(CheckpointError):
    """No family plugin claimed a checkpoint."""

    def __init__(self, source: str, telling_keys: Sequence[str], families_asked: Sequence[str]) -> None:
        keys = ", ".join(telling_keys) if telling_keys else "(no tensors)"
        asked = ", ".join(families_asked) if families_asked else "none (no family plugin is installed)"
        super().__init__(
            f"No installed family recognises the checkpoint {source}. Its most telling keys: {keys}. "
            f"Families asked: {asked}. Install the plugin for this model (see `diffstudio plugins`), "
            f"or check that the file is a complete model rather than a LoRA or an adapter."
        )
        self.source = source
        self.telling_keys = list(telling_keys)
        self.families_asked = list(families_asked)


class AmbiguousCheckpointError(CheckpointError):
    """Two or more plugins claimed the same checkpoint."""

    def __init__(self, source: str, claims: Sequence[str]) -> None:
        super().__init__(
            f"The checkpoint {source} is claimed by more than one plugin: {'; '.join(claims)}. "
            f"This is a bug in one of those plugins' detection rules; disable one of them with "
            f"DIFFSTUDIO_DISABLED_PLUGINS=<name> and report it."
        )
        self.source = source
        self.claims = list(claims)


class StrictLoadError(CheckpointError):
    """A state dict does not match the module it is loaded into."""

    def __init__(
        self,
        module: str,
        missing: Sequence[str],
        unexpected: Sequence[str],
        mismatched: Sequence[str] = (),
        source: str | None = None,
    ) -> None:
        origin = f" from {source}" if source else ""
        parts = [f"Loading weights{origin} into {module} failed (strict)."]
        if missing:
            parts.append(f"Missing keys ({len(missing)}): {', '.join(missing[:20])}" + (" ..." * (len(missing) > 20)))
        if unexpected:
            parts.append(
                f"Unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." * (len(unexpected) > 20))
            )
        if mismatched:
            parts.append(f"Shape mismatches ({len(mismatched)}): {', '.join(mismatched[:20])}")
        parts.append("The file does not belong to this model variant, or a converter is missing.")
        super().__init__(" ".join(parts))
        self.module = module
        self.source = source
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


class ModelNotFoundError(DiffstudioError):
    """A ModelConfig could not be resolved to local files."""

    def __init__(self, what: str, tried: Sequence[str], hint: str = "") -> None:
        lines = "\n  ".join(tried) if tried else "(nothing)"
        super().__init__(
            f"Could not find {what}. Paths tried:\n  {lines}\n"
            + (
                hint
                or "Pass ModelConfig(path=...) pointing at the files, or download them into one of the "
                "caches above (huggingface-cli / modelscope download)."
            )
        )
        self.tried = list(tried)


# --------------------------------------------------------------------------------------------------------------
# configuration and pipelines
# --------------------------------------------------------------------------------------------------------------


class ConfigError(DiffstudioError, ValueError):
    """A configuration value (device, dtype, budget, ...) is invalid."""


class PipelineInputError(DiffstudioError, ValueError):
    """A pipeline call received an invalid argument."""


class UnitGraphError(DiffstudioError):
    """Pipeline units cannot be ordered, or a unit broke its declared contract."""


class TemplateError(DiffstudioError):
    """A Diffusion Template could not be loaded, trusted or merged."""


class UntrustedCodeError(TemplateError):
    """A folder ships Python code and the caller did not opt in with trust_code=True."""


class RemoteCodeDisabledError(UntrustedCodeError):
    """Template code was refused because ``DIFFSTUDIO_DISABLE_REMOTE_CODE=1`` is set (even with trust_code)."""


class CodeHashMismatchError(UntrustedCodeError):
    """A template's ``model.py`` does not have the SHA-256 the caller pinned with ``code_sha256``."""


class TemplateFormatError(TemplateError):
    """A template folder, ``template.json`` or template class breaks the template format."""


class TemplateInputError(TemplateError, ValueError):
    """Template inputs do not fit the template they are routed to (unknown or missing keys, bad model_id)."""


class TemplateCacheKeyError(TemplateError, ValueError):
    """A template's cache names an input the base pipeline does not declare."""

    def __init__(self, template: str, key: str, accepted: Sequence[str], branch: str = "positive") -> None:
        shown = ", ".join(sorted(accepted)) or "(none)"
        side = "negative " if branch == "negative" else ""
        super().__init__(
            f"The template {template!r} produced the {side}cache key {key!r}, which the base pipeline does not "
            f"accept. A template cache may only name inputs of the base pipeline; accepted {side}keys: {shown}. "
            f"Install the medium plugin that serves {key!r} (see `diffstudio plugins`), or fix the template."
        )
        self.template = template
        self.key = key
        self.accepted = sorted(accepted)


class CacheMergeError(TemplateError):
    """Template caches for one pipeline input cannot be merged."""


class CacheFormatError(TemplateError, ValueError):
    """A template cache value has the wrong structure or shapes for its medium (KV cache, LoRA, residuals)."""


class TrustFlagError(UntrustedCodeError, TypeError):
    """A trust argument (``trust_code``, ``code_sha256``) has the wrong type; nothing was executed."""


class TemplateGeometryError(TemplateError, ValueError):
    """A template was made for a DiT of another geometry (block counts, heads, head dim) than the pipeline's."""


class LimitExceededError(PipelineInputError):
    """A pipeline argument exceeds a documented size limit (pixels, steps, tokens, batch); refused before allocating.

    The message names the limit, its value and how to raise it (an environment variable or ``pipe.limits``).
    """


class NonFiniteOutputError(DiffstudioError):
    """The model produced NaN or Inf values (weights with NaN/Inf, or a dtype that overflows)."""


class PluginHookError(PluginError):
    """A plugin's hook raised an unexpected exception or returned something its hookspec does not allow.

    Outside strict mode the plugin is disabled with a one-line warning and the host goes on without it; with
    ``DIFFSTUDIO_STRICT_PLUGINS=1`` this error is raised instead. It names the plugin and the hook.
    """

    def __init__(self, message: str, plugin: str = "", hook: str = "") -> None:
        super().__init__(message)
        self.plugin = plugin
        self.hook = hook


class NoPipelineError(PipelineInputError):
    """No installed pipeline runs the family that claimed a model (its pipeline plugin is missing)."""
