"""The project's exception hierarchy: every error a user can cause derives from GeodistillError."""


class GeodistillError(Exception):
    """Base class: an error with a message that says what is wrong and what to do."""


class ConfigError(GeodistillError):
    """params.yaml (or a stage's config) is invalid; the message lists every problem at once."""


class DataError(GeodistillError):
    """Input data is malformed; the message names the file, the record id and the field."""


class ShardError(GeodistillError):
    """WebDataset shards disagree with their manifest (missing, truncated or modified)."""


class CacheError(GeodistillError):
    """The teacher cache is missing, incomplete, or was built for another teacher/tokenizer/data."""


class ModelError(GeodistillError):
    """A checkpoint cannot be loaded or teacher and student are incompatible."""


class TrainingError(GeodistillError):
    """Training diverged (too many non-finite losses) or a checkpoint cannot be resumed."""
