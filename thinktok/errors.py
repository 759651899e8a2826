"""Bad input from the user: a config value, a path, a checkpoint that does not match the request. The CLI
reports these as one line and exit code 2; anything else is a bug and keeps its traceback. A ValueError
subclass, so library callers catching ValueError see no difference."""


class UserError(ValueError):
    pass
