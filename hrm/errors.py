"""Errors raised for bad input. The CLI prints the message on one line and exits with code 2."""


class HRMError(Exception):
    """Base class: a user-facing error with an actionable one-line message."""


class ModelConfigError(HRMError):
    """A model config is unknown, malformed or describes an unsupported architecture."""


class HardwareProfileError(HRMError):
    """A hardware profile file is missing, malformed or has out-of-range values."""


class WorkloadError(HRMError):
    """A workload has impossible sizes (negative lengths, zero sequences, ...)."""


class PolicyError(HRMError):
    """A policy is malformed or does not fit the model/hardware it is checked against."""


class InfeasibleError(HRMError):
    """No policy fits the memory limits; the message names the constraint and the shortfall."""
