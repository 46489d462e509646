"""``flashcrowd key create|revoke``: see services/cli/admin.py."""

from services.cli.admin import KeyCommand

NAME = KeyCommand.NAME
HELP = KeyCommand.HELP
add_arguments = KeyCommand.add_arguments
run = KeyCommand.run
