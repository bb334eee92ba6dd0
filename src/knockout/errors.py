"""The one exception type for bad input.

Library code raises :class:`KnockoutError` for anything the user can fix (unknown architecture, incompatible
statistics file, empty data, invalid fractions, missing paths...). Its message says what is wrong and what to do.
The CLI prints it as one line and exits with status 2 instead of showing a traceback.
"""


class KnockoutError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""
