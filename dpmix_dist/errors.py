"""User-facing errors: each message names the setting or file at fault and the fix. The CLI prints one line."""


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


class DataError(RuntimeError):
    """A data problem; the message names the file and the fix."""


class ModelError(RuntimeError):
    """A model problem; the message names the setting and the fix."""
