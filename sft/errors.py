"""The one error type for bad input: the CLI prints its message on one line and exits with code 2."""


class SftError(Exception):
    """A problem with the user's input (recipe, data, paths, options). The message names what and how to fix."""
