"""The one exception type for user mistakes (GUIDE rule 8).

A `PeftlabError` is caught once, in the CLI, and printed as one line with a non-zero exit status.
Any other exception is a bug in peftlab and keeps its traceback.
"""


class PeftlabError(Exception):
    """A problem with the user's input, named together with its fix."""
