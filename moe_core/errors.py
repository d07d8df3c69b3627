"""Errors raised while turning a checkpoint folder into a model.

Servers map them to gRPC status codes: `ModelNotFoundError` -> NOT_FOUND,
`UnsupportedModelError` -> FAILED_PRECONDITION. Messages name the path or the config field.
"""


class ModelError(Exception):
    """A model folder that cannot be served."""


class ModelNotFoundError(ModelError):
    """The folder, its config.json, its weights or one of the tensors it needs is missing."""


class UnsupportedModelError(ModelError):
    """An unknown model_type, an invalid config field or a feature this project does not serve."""
