"""Configuration: Istio's resources (and inmesh's MeshConfig) as validated, frozen values.

``Document`` is one YAML document with the line of each field; ``parse_documents`` turns
documents into the model values of ``inmesh.config.model`` or raises one ``ConfigError``
naming every problem; ``parse_duration`` reads Istio's duration text.
"""

from inmesh.config import model as _model
from inmesh.config.document import Document, FieldPath
from inmesh.config.model import *  # noqa: F403 - the model's names are this package's
from inmesh.config.parse import parse_documents, parse_duration

__all__ = [*_model.__all__, "Document", "FieldPath", "parse_documents", "parse_duration"]  # noqa: PLE0604
