"""What each `fedsoda` sub-command does, one module per group of commands."""
