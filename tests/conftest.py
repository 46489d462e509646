"""Root test configuration: shared fixtures live in plugin modules listed here.

Every process of the suite (servers started in-process and as subprocesses, test clients) shares one
gateway assertion key, set here before anything reads it.
"""

import os
import secrets

os.environ.setdefault("FLASHCROWD_GATEWAY_ASSERTION_KEY", secrets.token_hex(32))

pytest_plugins = [
    "tests.fixtures.s3server",
]
