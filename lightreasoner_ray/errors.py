"""The one exception type users see for bad input.

Every stage turns bad configuration, files, rows or models into a
``LightReasonerError`` whose message names what is wrong (file, line, field, key);
the CLI prints the message without a traceback.
"""


class LightReasonerError(Exception):
    """Bad input or an unrecoverable condition, with a message meant for the user."""
