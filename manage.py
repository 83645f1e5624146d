#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")
    from django.core.management import execute_from_command_line

    from gateway_project.config import exit_on_bad_settings

    # A bad value is one line naming it, for every command, not a traceback.
    exit_on_bad_settings()

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
