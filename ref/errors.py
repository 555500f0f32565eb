"""One exception type per failure domain. All derive from ValueError so callers can catch broadly."""


class ConfigError(ValueError):
    """config.json / hf_quant_config.json is missing a field or contradicts itself."""


class CheckpointError(ValueError):
    """A checkpoint file, header or tensor is missing, malformed or of the wrong shape/dtype."""


class FormatError(ValueError):
    """Input to an NVFP4 / FP8 codec has the wrong shape, dtype or block structure."""


class ImageError(ValueError):
    """An image file cannot be read, decoded or converted to RGB, or its size cannot be preprocessed."""
