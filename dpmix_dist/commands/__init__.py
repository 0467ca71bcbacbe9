"""The command-line programs. `launch/NAME.py` runs `dpmix_dist.commands.NAME.main`; each module's docstring is its
`--help` text. Every `main` runs its body through `errors.run_command` (a user error: one `error:` line, exit 2)."""
