"""Errors a user can fix. The command line prints them as one line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (file, config key, value, checkpoint).

    The message must say what is wrong and how to fix it, in one line.
    """


class ConfigError(UserError):
    """An unknown key, a wrong value type, or an unknown plugin name in a config."""
