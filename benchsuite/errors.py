"""User-facing errors. Each message names the bad input and says how to fix it."""


class BenchsuiteError(Exception):
    """Base class: the CLI prints these as one clean message, without a traceback."""


class DatasetError(BenchsuiteError):
    """A dataset folder is missing or does not follow the expected layout."""


class ProtocolError(BenchsuiteError):
    """A protocol file is unknown, malformed or changed without a version bump."""


class ContractError(BenchsuiteError):
    """A method plugin breaks the plugin contract (names the plugin and the hook)."""


class BackboneError(BenchsuiteError):
    """A backbone name, pretrained tag or checkpoint file cannot be loaded."""


class ResultError(BenchsuiteError):
    """A result file fails the JSON Schema or disagrees with its protocol."""


class Preempted(BaseException):
    """A job was asked to stop (a pre-emption signal) after saving its epoch checkpoint. A
    BaseException, like KeyboardInterrupt, so per-job failure handling never records it as a failure."""
