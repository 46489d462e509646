"""``flashcrowd tenant create|delete``: see services/cli/admin.py."""

from services.cli.admin import TenantCommand

NAME = TenantCommand.NAME
HELP = TenantCommand.HELP
add_arguments = TenantCommand.add_arguments
run = TenantCommand.run
