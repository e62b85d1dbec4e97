"""The ``deepseek-mini`` command: one module per command, the only code that parses
arguments or prints."""
