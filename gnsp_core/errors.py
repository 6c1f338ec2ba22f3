"""One exception type per kind of user mistake, so callers (CLI, HTTP) can map each to a clear message."""


class GnspError(Exception):
    """Base class: something the user can fix. `code` is a stable machine-readable name."""

    code = "gnsp_error"


class DatasetError(GnspError):
    """A task source (folder, archive, built-in name) is missing, malformed or unsafe."""

    code = "bad_dataset"


class ArchiveTypeError(DatasetError):
    """An uploaded dataset is not an archive at all (not a zip or tar, by content)."""

    code = "unsupported_media_type"


class ModelSpecError(GnspError):
    """A model name, pretrained tag or checkpoint file cannot be used."""

    code = "bad_model"


class ConfigError(GnspError):
    """A method name or training configuration value is invalid."""

    code = "bad_config"


class StateError(GnspError):
    """A saved continual state is missing, incomplete or does not match the model."""

    code = "bad_state"
