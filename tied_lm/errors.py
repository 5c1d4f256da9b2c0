"""The one error type for bad user input: `main` prints it as a single line."""


class UserError(Exception):
  """A problem with the config, the data or the workdir that the user can fix."""
