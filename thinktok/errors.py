"""The two errors thinktok reports as one line (`thinktok: error: ...`, exit code 2); anything else is a bug
and keeps its traceback. Light on purpose: the CLI imports this module before any command runs."""


class UserError(ValueError):
    """Bad input from the user: a config value, a path, a checkpoint that does not match the request. A
    ValueError subclass, so library callers catching ValueError see no difference."""


class PoisonedStep(FloatingPointError):
    """NaN/inf in rewards, gains, advantages or loss: the step stops before any optimizer step or checkpoint.
    Raised by the scorers' own checks and the learner's; never a wrapper around another error."""
