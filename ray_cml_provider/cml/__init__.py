"""Client for the Cloudera Machine Learning (CML) REST API v2. No Ray imports here."""

from ray_cml_provider.cml.client import CMLClient
from ray_cml_provider.cml.errors import (
    TRANSIENT_ERRORS,
    CMLAPIError,
    CMLAuthenticationError,
    CMLConfigurationError,
    CMLConnectionError,
    CMLError,
    CMLInvalidRequestError,
    CMLNotFoundError,
    CMLOutcomeUnknownError,
    CMLPermissionError,
    CMLRateLimitedError,
    CMLServerError,
)
from ray_cml_provider.cml.models import Application, ApplicationStatus, ProjectFile
from ray_cml_provider.cml.settings import CMLSettings, Secret
from ray_cml_provider.cml.transport import RetryPolicy

__all__ = [
    "Application",
    "ApplicationStatus",
    "CMLAPIError",
    "CMLAuthenticationError",
    "CMLClient",
    "CMLConfigurationError",
    "CMLConnectionError",
    "CMLError",
    "CMLInvalidRequestError",
    "CMLNotFoundError",
    "CMLOutcomeUnknownError",
    "CMLPermissionError",
    "CMLRateLimitedError",
    "CMLServerError",
    "CMLSettings",
    "ProjectFile",
    "RetryPolicy",
    "Secret",
    "TRANSIENT_ERRORS",
]
